"""Two processes that need the same artifact at once: one does the work, the other waits and reuses it.

Real OS processes, as two runs on one machine would be: each has its own file descriptors and pid, so the
locks see two processes. The stage-cache children are spawned (nothing inherited); the training and torchrun
children are forked, so they inherit the imported torch/diffusers and the tiny pipeline instead of spending
15 s each importing them on a busy 2-core machine. A holder killed with SIGKILL must not block the next
process, with flock and with the lock-file fallback.
"""

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from duobench import locks

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
CHILD_TIMEOUT = 120


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    logging.getLogger("duobench.locks").addHandler(handler)
    logging.getLogger("duobench.locks").setLevel(logging.INFO)


def _start_together(folder: Path, name: str) -> None:
    """Say this process is ready, then wait for the test's go: both processes ask for the lock at once."""
    (folder / f"ready-{name}").touch()
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no go from the test")
        time.sleep(0.01)


def _release_together(folder: Path, names: list[str], processes) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not all((folder / f"ready-{name}").exists() for name in names):
        assert all(p.exitcode in (None, 0) for p in processes), "a child died before it was ready"
        assert time.monotonic() < deadline, "children never got ready"
        time.sleep(0.05)
    (folder / "go").touch()
    for process in processes:
        process.join(CHILD_TIMEOUT)
        assert process.exitcode == 0, f"child exited with {process.exitcode}"


# ------------------------------------------------------------------------------------- method artifacts


def _train_in_child(name: str, folder: str, pipe, concept, rank: int | None = None, port: int = 0) -> None:
    """``train_or_load`` of a counted UCE; with ``rank``, as one rank of a 2-process gloo job."""
    import torch

    from duobench.baselines import uce
    from duobench.methods import train_or_load
    from duobench.registry import METHODS

    if rank is not None:  # what torchrun sets, and duobench.distributed.process_info reads
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    folder = Path(folder)
    _log_to(folder / f"log-{name}")

    def counted_train(config, pipe, concept, out_dir):
        with open(folder / "trainings", "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(3)  # long enough that the other process asks for the lock while this one trains
        uce.UCE.train(config, pipe, concept, out_dir)

    METHODS.register("uce-counted", dataclasses.replace(uce.UCE, name="uce-counted", train=counted_train))
    _start_together(folder, name)
    artifact, _, trained = train_or_load("uce-counted", pipe, concept, "tiny-random", root=folder / "artifacts")
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(artifact.iterdir())}
    result = {"pid": os.getpid(), "artifact": str(artifact), "trained": trained, "files": files}
    (folder / f"result-{name}.json").write_text(json.dumps(result))
    if rank is not None:
        torch.distributed.destroy_process_group()


def test_two_processes_train_one_artifact_once(tmp_path, tiny_pipe, concept):
    """UCE on tiny-random, its training counted and slowed down so that the second process arrives while
    the first trains."""
    names = ["a", "b"]
    processes = [FORK.Process(target=_train_in_child, args=(name, str(tmp_path), tiny_pipe, concept)) for name in names]
    for process in processes:
        process.start()
    _release_together(tmp_path, names, processes)

    results = [json.loads((tmp_path / f"result-{name}.json").read_text()) for name in names]
    assert len((tmp_path / "trainings").read_text().splitlines()) == 1
    trainer, reuser = sorted(results, key=lambda r: not r["trained"])
    assert trainer["trained"] and not reuser["trained"]
    assert trainer["artifact"] == reuser["artifact"]
    assert trainer["files"] == reuser["files"] and "card.json" in trainer["files"]
    key = Path(trainer["artifact"]).name
    waited = (tmp_path / f"log-{names[results.index(reuser)]}").read_text()
    assert f"waiting for another process training uce-counted {key} (lock held by pid {trainer['pid']}" in waited
    leftovers = sorted(p.name for p in (tmp_path / "artifacts" / "uce-counted").iterdir())
    assert leftovers == [key]  # no staging folder, no lock file


def test_a_torchrun_job_and_a_single_process_train_one_artifact_once(tmp_path, tiny_pipe, concept):
    """Both ranks of a job call train_or_load together (and train together); the job and a separate process
    train the artifact once between them: whichever comes second waits and reuses it."""
    names = ["rank0", "rank1", "single"]
    port = _free_port()
    processes = [
        FORK.Process(target=_train_in_child, args=(name, str(tmp_path), tiny_pipe, concept, rank, port))
        for name, rank in zip(names, [0, 1, None], strict=True)
    ]
    for process in processes:
        process.start()
    _release_together(tmp_path, names, processes)

    results = {name: json.loads((tmp_path / f"result-{name}.json").read_text()) for name in names}
    trainers = sorted(int(pid) for pid in (tmp_path / "trainings").read_text().split())
    job_pids = sorted(results[name]["pid"] for name in ["rank0", "rank1"])
    assert trainers in (job_pids, [results["single"]["pid"]])
    job_trained = trainers == job_pids
    assert results["rank0"]["trained"] == results["rank1"]["trained"] == job_trained
    assert results["single"]["trained"] == (not job_trained)
    assert len({r["artifact"] for r in results.values()}) == 1
    assert len({json.dumps(r["files"]) for r in results.values()}) == 1
    waiter = "single" if job_trained else "rank0"
    assert "waiting for another process training uce-counted" in (tmp_path / f"log-{waiter}").read_text()
    assert (tmp_path / "log-rank1").read_text() == ""  # only rank 0 takes (and waits for) the job's lock
    assert len(list((tmp_path / "artifacts" / "uce-counted").iterdir())) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ DUO pair sets, attacks


def _pairs_in_child(name: str, folder: str, pipe) -> None:
    from duobench.concepts import Concept, DuoPairSpec, PromptSetSpec
    from duobench.duo import pairs

    folder = Path(folder)
    _log_to(folder / f"log-{name}")
    generate = pairs._generate_pairs

    def counted_generate(*args, **kwargs):
        with open(folder / "generations", "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(2)
        return generate(*args, **kwargs)

    pairs._generate_pairs = counted_generate
    concept = Concept(
        name="tiny",
        description="",
        erase_prompt="red",
        judge="none",
        prompt_sets={},
        benign_prompts=PromptSetSpec(source="inline", prompts=("a blue circle",)),
        data_judge="none",
        duo_pairs=(DuoPairSpec("a red star", "a blue star", 2),),
        duo_strength=0.75,
        generation={"steps": 2, "height": 32, "width": 32, "guidance": 7.5, "scheduler": "pndm"},
    )
    _start_together(folder, name)
    pair_set = pairs.build_pair_set(pipe, concept, judge=None, root=folder / "pairs", batch_size=2)
    files = {
        str(p.relative_to(pair_set.folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(pair_set.folder.rglob("*.*"))
    }
    (folder / f"result-{name}.json").write_text(json.dumps({"folder": str(pair_set.folder), "files": files}))


def test_two_processes_generate_one_duo_pair_set_once(tmp_path, tiny_pipe):
    names = ["a", "b"]
    processes = [FORK.Process(target=_pairs_in_child, args=(name, str(tmp_path), tiny_pipe)) for name in names]
    for process in processes:
        process.start()
    _release_together(tmp_path, names, processes)

    results = [json.loads((tmp_path / f"result-{name}.json").read_text()) for name in names]
    assert len((tmp_path / "generations").read_text().splitlines()) == 1
    assert results[0] == results[1] and len(results[0]["files"]) == 5  # pairs.json + 2 unsafe + 2 safe
    logs = "".join((tmp_path / f"log-{name}").read_text() for name in names)
    assert "waiting for another process generating the DUO pair set" in logs
    assert [p.name for p in (tmp_path / "pairs").iterdir()] == [Path(results[0]["folder"]).name]


def _attack_in_child(name: str, folder: str, pipe, concept) -> None:
    from duobench.attacks.none import NoAttack
    from duobench.attacks.run import result_record, run_attack

    folder = Path(folder)
    _log_to(folder / f"log-{name}")
    attack = NoAttack.attack

    def counted_attack(self, rows, budget):
        with open(folder / "attacks", "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(2)
        yield from attack(self, rows, budget)

    NoAttack.attack = counted_attack
    _start_together(folder, name)
    results = run_attack("none", concept, pipe, None, str(folder / "rows.csv"), None, folder / "attacks-cache")
    (folder / f"result-{name}.json").write_text(json.dumps([result_record(r) for r in results], default=str))


def test_two_processes_run_one_attack_once(tmp_path, tiny_pipe, concept):
    (tmp_path / "rows.csv").write_text("prompt,evaluation_seed\na red star,1\na red star at night,2\n")
    names = ["a", "b"]
    processes = [
        FORK.Process(target=_attack_in_child, args=(name, str(tmp_path), tiny_pipe, concept)) for name in names
    ]
    for process in processes:
        process.start()
    _release_together(tmp_path, names, processes)

    results = [json.loads((tmp_path / f"result-{name}.json").read_text()) for name in names]
    assert len((tmp_path / "attacks").read_text().splitlines()) == 1
    assert results[0] == results[1] and [r["source_prompt"] for r in results[0]] == [
        "a red star",
        "a red star at night",
    ]
    logs = "".join((tmp_path / f"log-{name}").read_text() for name in names)
    assert "waiting for another process running the none attack" in logs


# ------------------------------------------------------------------------------------------ stage cache


def _stage_in_child(name: str, folder: str) -> None:
    from duobench.stages import StageCache

    folder = Path(folder)
    _log_to(folder / f"log-{name}")

    def compute():
        with open(folder / "computations", "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.5)
        return {"dsr": 0.75, "by": os.getpid()}

    stages = StageCache(folder / "stages")
    _start_together(folder, name)
    result = stages.run("judge", {"images": ["k1", "k2"], "card": "judge@1"}, compute)
    summary = {"result": result, "hits": stages.hits["judge"], "misses": stages.misses["judge"]}
    (folder / f"result-{name}.json").write_text(json.dumps(summary))


def test_two_processes_compute_one_stage_once(tmp_path):
    names = ["a", "b"]
    processes = [SPAWN.Process(target=_stage_in_child, args=(name, str(tmp_path))) for name in names]
    for process in processes:
        process.start()
    _release_together(tmp_path, names, processes)

    results = [json.loads((tmp_path / f"result-{name}.json").read_text()) for name in names]
    assert len((tmp_path / "computations").read_text().splitlines()) == 1
    assert results[0]["result"] == results[1]["result"]
    assert sorted((r["hits"], r["misses"]) for r in results) == [(0, 1), (1, 0)]
    assert "waiting for another process computing the judge stage" in "".join(
        (tmp_path / f"log-{name}").read_text() for name in names
    )


# ------------------------------------------------------------------------------------ killed lock holders

HOLDER = """
import sys, time
from duobench.locks import exclusive
with exclusive(sys.argv[1], "holding"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["flock", "lockfile"])
def test_a_holder_killed_with_sigkill_does_not_block_the_next_process(tmp_path, monkeypatch, caplog, mode):
    monkeypatch.setenv("DUOBENCH_LOCKS", mode)
    target = tmp_path / "artifact"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        def kill():
            holder.kill()  # SIGKILL: no finally, no atexit; only the kernel can let go of the lock
            holder.wait()

        killer = threading.Timer(1.0, kill)
        killer.start()
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="duobench.locks"):
            with locks.exclusive(target, "testing", timeout=30):
                waited = time.monotonic() - started
                assert holder.wait(5) == -9  # the lock came free only through the kill
        killer.join()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert 0.9 < waited < 15
    assert (
        f"waiting for another process testing (lock held by pid {holder.pid} on {socket.gethostname()}" in caplog.text
    )
    assert not (tmp_path / "artifact.lock").exists()


def test_a_lock_file_of_a_silent_holder_on_another_host_is_broken(tmp_path, monkeypatch, caplog):
    """Another host's process cannot be asked whether it lives; a heartbeat that stopped says it is gone."""
    monkeypatch.setenv("DUOBENCH_LOCKS", "lockfile")
    monkeypatch.setattr(locks, "STALE_SECONDS", 1.5)
    target = tmp_path / "artifact"
    (tmp_path / "artifact.lock").write_text(json.dumps({"pid": 123, "host": "another-node", "token": "t", "beat": 7}))
    with caplog.at_level(logging.WARNING, logger="duobench.locks"):
        with locks.exclusive(target, "testing", timeout=10):
            assert json.loads((tmp_path / "artifact.lock").read_text())["pid"] == os.getpid()
    assert "lock held by pid 123 on another-node" in caplog.text
    assert "removed the stale lock file" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_system_that_refuses_flock_falls_back_to_lock_files(tmp_path, monkeypatch, caplog):
    """Lustre without -o flock, say: flock fails with ENOLCK/ENOSYS, and the lock file takes over."""
    import errno

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_flock_support", {})
    with caplog.at_level(logging.WARNING, logger="duobench.locks"):
        with locks.exclusive(tmp_path / "artifact", "testing"):
            assert "token" in json.loads((tmp_path / "artifact.lock").read_text())  # an O_EXCL lock file
    assert "flock is not available" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_live_holder_keeps_its_lock_until_it_releases_it(tmp_path):
    """Another thread waits as another process would (or gives up at its timeout); the same thread may nest."""
    target = tmp_path / "artifact"
    entered, gave_up = [], []

    def patient():
        with locks.exclusive(target, "from another thread"):
            entered.append(time.monotonic())

    def impatient():
        try:
            with locks.exclusive(target, "impatient", timeout=0.2):
                entered.append("impatient")
        except TimeoutError as error:
            gave_up.append(str(error))

    with locks.exclusive(target, "outer"):
        with locks.exclusive(target, "nested in the same thread"):
            pass
        waiter = threading.Thread(target=patient)
        waiter.start()
        quitter = threading.Thread(target=impatient)
        quitter.start()
        quitter.join(10)
        time.sleep(0.3)
        assert not entered
        released = time.monotonic()
    waiter.join(10)
    assert entered and entered[0] >= released
    assert gave_up and "lock held by pid" in gave_up[0]


# ------------------------------------------------------------------------------------ a torchrun job


def _job_rank(rank: int, port: int, folder: str) -> None:
    import torch

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    folder = Path(folder)
    (folder / f"ready-{rank}").touch()
    with locks.exclusive_for_job(folder / "artifact", "training in a job"):
        entered = time.time()
        held_here = (folder / "artifact.lock").exists() and json.loads((folder / "artifact.lock").read_text())
        time.sleep(1.0)  # the test checks meanwhile that an outside process cannot take the lock
        torch.distributed.barrier()
    chosen = locks.from_main_rank(f"rank {rank}")
    (folder / f"result-{rank}.json").write_text(
        json.dumps({"entered": entered, "holder": held_here and held_here["pid"], "pid": os.getpid(), "chosen": chosen})
    )
    torch.distributed.destroy_process_group()


def test_a_torchrun_job_waits_for_the_lock_on_rank_0_and_its_ranks_enter_together(tmp_path):
    """Two gloo ranks forked while this process holds the lock (so a forked child must not inherit it)."""
    port = _free_port()
    target = tmp_path / "artifact"
    with locks.exclusive(target, "holding outside the job"):
        ranks = [FORK.Process(target=_job_rank, args=(rank, port, str(tmp_path))) for rank in range(2)]
        for rank in ranks:
            rank.start()
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not all((tmp_path / f"ready-{rank}").exists() for rank in range(2)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # both ranks now wait for this process's lock
        released = time.time()
    while not (tmp_path / "artifact.lock").exists():  # rank 0 takes it for the job
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(TimeoutError):
        with locks.exclusive(target, "outside while the job holds it", timeout=0.3):
            pass
    for rank in ranks:
        rank.join(CHILD_TIMEOUT)
        assert rank.exitcode == 0

    ranks = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(2)]
    assert all(r["entered"] >= released for r in ranks)
    assert ranks[0]["holder"] == ranks[1]["holder"] == ranks[0]["pid"]  # rank 0 held the lock for the job
    assert [r["chosen"] for r in ranks] == ["rank 0", "rank 0"]
    assert not (tmp_path / "artifact.lock").exists()
