"""The applications on top of every layer: the `marl-sd` command line, benchmarks, the scenario
suite, reports, the GPU profiler, Ray sweeps, and the tools that run the live system (launcher,
calibration, chaos) or replay it in simulation (controller_policy)."""
