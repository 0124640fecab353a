"""Preemption (saejax/train/runner.py `Preemption`): SIGTERM at a random moment of `saejax train`
ends every process of the run with exit 75 and one line naming the step all of them saved; the
same command then resumes and ends bitwise equal to a run never interrupted (parameters, Adam
moments, dead-feature record, RNG; metrics.jsonl the same).

- One process (2 fake devices): the SIGTERM handler's flag, read after each step.
- Two processes of 1 device (launch/local.py's environments, jax.distributed over gloo): JAX's
  preemption sync point, the signal sent to one of them, chosen at random.
- Slow: three random moments each for one process, two with the signal to both, and two
  without JAX's preemption service (JAX_ENABLE_PREEMPTION_SERVICE=false: the all-gathered flag).

JAX's SIGTERM listener polls once a second, so a preempted run must outlast its signal by more
than a second on any machine: PADDED_RUN adds a pause to every step (it changes no value). One
uninterrupted reference (one process, 2 devices) serves both layouts: with `data` split over 2
devices every all-reduce has 2 participants, so gloo's sums and XLA's in-process ones agree
(tests/test_train_e2e.py). The runs share a persistent compilation cache (compiling is most of
a tiny run's time); the runs and their resumes go in the background as soon as the module starts.
"""

from __future__ import annotations

import concurrent.futures
import random
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_train_e2e import (REF_ARGS, TIMEOUT, Run, _env, _launcher, assert_states_bitwise_equal,
                            deterministic, read_metrics, restore)

STEPS = 100
ARGS = ["train", "--quiet", *REF_ARGS, f"train.steps={STEPS}", "train.checkpoint_every=40",
        "mesh.model=1"]  # REF_ARGS' other settings: resampling at steps 30 and 60, log every 5
MAX_DELAY_S = 0.8  # the signal comes up to this long after the first log record (step 5)
PAD_S = {1: 0.01, 2: 0.03}  # per step: a preempted run's loop lasts at least 1 s (one process:
# it stops after the step the signal came in) or 3 s (two: JAX's agreement can take 1 s more)
EXIT_PREEMPTED = 75

PADDED_RUN = textwrap.dedent("""
    import os, sys, time
    from saejax.train import runner

    agreed, pad = runner.Preemption.agreed, float(os.environ["SAEJAX_TEST_PAD_S"])

    def padded(self, n):
        time.sleep(pad)
        return agreed(self, n)

    runner.Preemption.agreed = padded
    from saejax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start(run_dir: Path, processes: int, padded: bool, env: dict, tag: str) -> list[Run]:
    """The run as one process of 2 devices (no jax.distributed), or as 2 of 1 device each
    (launch/local.py's environments)."""
    code = ["-c", PADDED_RUN] if padded else ["-m", "saejax.cli"]
    envs = [_env(2)] if processes == 1 else _launcher().worker_envs(processes, 2 // processes)
    return [Run([sys.executable, *code, *ARGS, f"train.run_dir={run_dir}"], {**e, **env},
                run_dir.parent / f"{run_dir.name}.{tag}{i}.log") for i, e in enumerate(envs)]


def _loop_started(run_dir: Path, procs: list[Run]) -> None:
    """Wait for the first log record: the step loop is running."""
    deadline = time.monotonic() + TIMEOUT
    while '"loss"' not in _text(run_dir / "metrics.jsonl"):
        assert all(p.proc.poll() is None for p in procs), [p.output() for p in procs]
        assert time.monotonic() < deadline, "no log record"
        time.sleep(0.01)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def preempt_and_resume(run_dir: Path, processes: int, rng: random.Random, *, everyone=False,
                       env: dict | None = None) -> dict:
    """Start the run, SIGTERM one process (or every one) a random moment after its loop
    started, wait for all to exit, note what they left, then resume it with the same command."""
    procs = _start(run_dir, processes, True,
                   {**(env or {}), "SAEJAX_TEST_PAD_S": str(PAD_S[processes])}, "preempted")
    try:
        _loop_started(run_dir, procs)
        delay = rng.uniform(0, MAX_DELAY_S)
        targets = list(range(processes)) if everyone else [rng.randrange(processes)]
        time.sleep(delay)
        for i in targets:
            procs[i].proc.terminate()
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            p.kill()
    what = {"drawn": f"SIGTERM to {targets} {delay:.3f} s after step 5", "codes": codes,
            "outputs": [p.output() for p in procs], "committed": _committed(run_dir),
            "tmp": [p.name for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]}
    resumed = _start(run_dir, processes, False, env or {}, "resumed")
    what["resumed"] = [p.wait() for p in resumed]
    what["resumed_outputs"] = [p.output() for p in resumed]
    return what


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """The environment of a JAX persistent compilation cache shared by the module's runs."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache):
    """(run_dir, Run): the uninterrupted reference, started now."""
    run_dir = tmp_path_factory.mktemp("preemption") / "ref"
    [run] = _start(run_dir, 1, False, cache, "")
    yield run_dir, run
    run.kill()


@pytest.fixture(scope="module")
def background(reference_run, cache):
    """{"one": Future, "two": Future}: the one- and two-process preempt-and-resume scenarios,
    the two-process one started now beside the reference, the other once the reference has
    filled the cache with the programs it runs too."""
    d, ref = reference_run

    def one() -> dict:
        ref.proc.wait()
        return preempt_and_resume(d.parent / "one", 1, random.Random(), env=cache)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # leaving it waits for both
        yield {"dir": d.parent, "one": pool.submit(one),
               "two": pool.submit(preempt_and_resume, d.parent / "two", 2, random.Random(),
                                  env=cache)}


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    run_dir, run = reference_run
    assert run.wait() == 0, run.output()
    return run_dir


def check_preempted_then_resumed(run_dir: Path, what: dict, reference: Path) -> int:
    """The assertions of one scenario; returns the step it was preempted at."""
    why = (what["drawn"], what["codes"], what["outputs"])
    assert what["codes"] == [EXIT_PREEMPTED] * len(what["codes"]), why
    steps = set()
    for out in what["outputs"]:
        assert "Traceback" not in out, why
        lines = re.findall(r"^saejax: preempted: saved step (\d+) in (.+); rerun the same command "
                           r"to resume$", out, re.M)
        assert len(lines) == 1 and lines[0][1] == str(run_dir / "checkpoints"), why
        steps.add(int(lines[0][0]))
    [step] = steps  # every process names the same step
    assert 5 <= step < STEPS and what["committed"][-1] == step and not what["tmp"], why

    assert what["resumed"] == [0] * len(what["resumed"]), (why, what["resumed_outputs"])
    got_step, got, _ = restore(run_dir)
    ref_step, want, _ = restore(reference)
    assert got_step == ref_step == STEPS
    assert_states_bitwise_equal(got, want)
    # Each log step, resampling event and the summary once, with the reference's numbers.
    assert ([deterministic(r) for r in read_metrics(run_dir)]
            == [deterministic(r) for r in read_metrics(reference)]), why
    return step


def test_sigterm_one_process_saves_exits_75_and_resumes_bitwise(background, reference):
    check_preempted_then_resumed(background["dir"] / "one", background["one"].result(), reference)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(background, reference):
    check_preempted_then_resumed(background["dir"] / "two", background["two"].result(), reference)


@pytest.mark.slow
@pytest.mark.parametrize("processes, everyone, env", [
    (1, False, {}),
    (2, True, {}),
    (2, False, {"JAX_ENABLE_PREEMPTION_SERVICE": "false"}),
], ids=["one-process", "two-processes-all-signalled", "two-processes-without-jax-service"])
def test_sigterm_at_three_random_moments(processes, everyone, env, reference, cache, tmp_path):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = {tmp_path / f"run{i}": pool.submit(preempt_and_resume, tmp_path / f"run{i}",
                                                  processes, random.Random(), everyone=everyone,
                                                  env={**cache, **env})
                for i in range(3)}
        steps = [check_preempted_then_resumed(d, f.result(), reference) for d, f in runs.items()]
    if env:  # the fallback agrees every AGREE_EVERY steps
        from saejax.train.runner import AGREE_EVERY

        assert all(s % AGREE_EVERY == 0 for s in steps), steps


@pytest.mark.slow
def test_train_lm_shares_the_mechanism(tmp_path, monkeypatch):
    """`saejax train-lm` runs the same loop: in process, a SIGTERM after step 4 stops train_lm
    with Preempted and a step-4 checkpoint; calling it again ends bitwise where an uninterrupted
    run ends (exported weights, metrics)."""
    import dataclasses
    import os
    import signal

    import numpy as np
    from test_lm_train import CTX, V, _cfg, _IntTokenizer, _params, _records

    from saejax.errors import Preempted
    from saejax.text.tokens import write_token_dataset
    from saejax.train import runner
    from saejax.train.lm import train_lm

    rng = np.random.default_rng(0)
    docs = [" ".join(map(str, rng.integers(1, V, 60))) for _ in range(60)]
    write_token_dataset(docs, _IntTokenizer(), tmp_path / "tokens", CTX, contexts_per_shard=100)

    def cfg(name: str):
        c = _cfg(tmp_path / "tokens", tmp_path / name, steps=12, log_every=2, eval_every=0,
                 checkpoint_every=10)
        return dataclasses.replace(c, data=dataclasses.replace(c.data, val_contexts=8))

    train_lm(cfg("ref"), quiet=True)
    agreed = runner.Preemption.agreed

    def sigterm_after_step_4(self, n):
        if n == 4:  # the runner's handler is in place, or the signal would end pytest
            assert signal.getsignal(signal.SIGTERM) == self._on_sigterm
            os.kill(os.getpid(), signal.SIGTERM)
        return agreed(self, n)

    monkeypatch.setattr(runner.Preemption, "agreed", sigterm_after_step_4)
    with pytest.raises(Preempted, match=r"^saved step 4 in .*; rerun the same command"):
        train_lm(cfg("run"), quiet=True)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4"]
    train_lm(cfg("run"), quiet=True)
    want, got = _params(tmp_path / "ref"), _params(tmp_path / "run")
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
    want, got = _records(tmp_path / "ref"), _records(tmp_path / "run")
    assert {k: strip(r) for k, r in want.items()} == {k: strip(r) for k, r in got.items()}
