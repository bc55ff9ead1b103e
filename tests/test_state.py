"""The simulator state is declared once (marl_sd.envs.state): the simulator holds exactly the
declared tensors plus a known set of derived ones, and save/restore goes through the table."""

import typing

import pytest
import torch
from conftest import stepped_sim

from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.state import REQUEST_LOG_COLUMNS, STATE, STATE_VARS, SimState, check_state

pytestmark = pytest.mark.unit

# recomputed from the state (rates, masks, lookup tables) or drawn afresh each slot
DERIVED = {
    "_acc_user",
    "_g_range",
    "_u_arr",
    "_u_req",
    "bid_table",
    "prio_table",
    "dl_rate",
    "dl_rate_mat",
    "ul_rate",
    "ul_rate_mat",
    "mask",
    "power_kw",
    "site_factor",  # derived from the clock and scenario.site_events
    "site_down",
}


@pytest.fixture()
def sim():
    return stepped_sim(30, seed=2, record_requests=True)


def test_every_tensor_is_declared_or_derived(sim):
    tensors = {k for k, v in vars(sim).items() if isinstance(v, torch.Tensor)}
    assert tensors - set(STATE) == DERIVED, "a new simulator tensor must be declared in envs/state.py"
    assert set(STATE) <= tensors


def test_the_state_is_typed_fields_of_the_simulator():
    """What an IDE or a type checker reads: every declared variable is an annotated tensor
    attribute of `BatchedSimulator`, and the constructor refuses an undeclared one."""
    hints = typing.get_type_hints(BatchedSimulator)
    assert [k for k in STATE if hints.get(k) is not torch.Tensor] == []
    with pytest.raises(TypeError, match="not_a_state_var"):
        SimState(**dict.fromkeys(STATE, torch.zeros(1)), not_a_state_var=torch.zeros(1))


def test_declared_shapes_and_dtypes_hold_after_steps(sim):
    check_state(sim.get_state(), sim.sizes)
    assert all(v.doc for v in STATE_VARS.values())


def test_restore_from_the_table_reproduces_the_future(sim):
    gen = torch.Generator().manual_seed(5)
    st = sim.get_state()
    acts = [sim.actions.random_valid(sim.mask, gen) for _ in range(1)]
    a = acts[0]
    r1, _ = sim.step(a)
    o1 = sim.observations()
    sim.set_state(st)
    r2, _ = sim.step(a)
    assert torch.equal(r1, r2) and torch.equal(o1, sim.observations())


def test_a_foreign_state_is_rejected_by_name(sim):
    st = sim.get_state()
    st["timer"] = st["timer"][:, :2]
    del st["q_len"]
    with pytest.raises(ValueError, match="timer.*expected|q_len missing"):
        sim.set_state(st)


def test_request_log_by_column_name(sim):
    log = sim.finished_requests()
    assert list(log) == list(REQUEST_LOG_COLUMNS)
    n = len(log["env"])
    assert n > 0 and all(len(v) == n for v in log.values())
    assert (log["latency_ms"] >= log["ttft_ms"]).all() and (log["output_tokens"] >= 1).all()
    assert set(log["user"].astype(int)) <= set(range(sim.N))
