"""The system model both sides read: latency profiles, message and site costs, the latency model and
the observation features. The simulator (`marl_sd.envs`) steps it in torch; the live controller
(`marl_sd.serving`) encodes reports with it in numpy. Torch-free at import."""
