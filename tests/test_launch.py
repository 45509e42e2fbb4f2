"""launch/*.sh: syntax, shellcheck, and the commands the TPU / GPU launchers would run.

The TPU launcher is exercised only through ``--dry-run`` with a fake ``gcloud`` (and ``git``)
first on PATH that records any call, so no test touches a cloud project. The printed remote
scripts are checked with ``bash -n`` and the training command is expanded by bash and parsed by
the real config loader, so quoting mistakes in the overrides fail here, not on a TPU pod.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from data_prep.tokenize import host_shards
from pianist_jax.config import config_from_cli

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
TPU = LAUNCH / "tpu_pretrain.sh"
GPU = LAUNCH / "gpu_pretrain.sh"
# Settings the launchers read from the environment: cleared so the caller's shell cannot leak in.
LAUNCH_ENV = (
    "TPU_NAME",
    "ZONE",
    "PROJECT",
    "ACCELERATOR_TYPE",
    "RUNTIME_VERSION",
    "NUM_WORKERS",
    "BUCKET",
    "OUT",
    "RUN",
    "SHARDS",
    "DATA",
    "CONFIG",
    "SPOT",
    "STAGES",
    "COORDINATOR",
    "NUM_NODES",
    "NODE_RANK",
    "COORDINATOR_PORT",
)
TPU_ARGS = [
    "--dry-run",
    "--name",
    "pianist",
    "--zone",
    "us-central2-b",
    "--project",
    "my-proj",
    "--accelerator-type",
    "v4-32",
    "--bucket",
    "my-bucket",
]
JAX_PIN = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)


def test_launch_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"tpu_pretrain.sh", "gpu_pretrain.sh", "tokenize_shared.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (CI: apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH entry whose gcloud and git record their calls in `calls` and fail."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("gcloud", "git"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 97\n')
        (bin_dir / tool).chmod(0o755)
    return bin_dir, calls


def launch(script, args, fake_bin, env=None, check=True):
    bin_dir, calls = fake_bin
    base = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM")
    }
    base["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(
        ["bash", str(script), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert not calls.exists(), f"dry run called: {calls.read_text()}"
    if check:
        assert result.returncode == 0, result.stderr
    return result


def parse(stdout):
    """Dry-run output -> (commands, notes). A command is (argv, remote script or None)."""
    commands, notes, lines = [], [], iter(stdout.splitlines())
    for line in lines:
        if line.startswith("# "):
            notes.append(line[2:])
            continue
        assert line.startswith("+ "), line
        head, sep, _ = line[2:].partition(" --command=\"$(cat <<'REMOTE'")
        remote = None
        if sep:
            body = []
            for body_line in lines:
                if body_line == "REMOTE":
                    break
                body.append(body_line)
            assert next(lines) == ')"'
            remote = "\n".join(body)
        commands.append((shlex.split(head), remote))
    return commands, notes


def ssh_commands(commands):
    return [
        (argv, remote)
        for argv, remote in commands
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    ]


def worker_of(argv):
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--worker="))


def train_argv(remote, home="/home/tpu"):
    """The python argv of the training command, expanded by bash as on a worker."""
    start = remote.index("python -m pianist_jax.train")
    script = 'python() { printf "%s\\n" "$@"; }\n' + remote[start:].split(" > ", 1)[0]
    out = subprocess.run(
        ["bash", "-c", script],
        env={"HOME": home, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


# --------------------------------------------------------------------------- TPU


def test_tpu_dry_run_full_sequence_for_four_workers(fake_bin):
    result = launch(TPU, [*TPU_ARGS, "--teardown", "train.steps=12345"], fake_bin)
    commands, notes = parse(result.stdout)
    assert "4 workers" in notes[0]
    where = ["--zone=us-central2-b", "--project=my-proj"]
    kinds = [argv[4] if argv[0] == "gcloud" else argv[0] for argv, _ in commands]
    assert kinds == [
        "describe",
        "create",
        "git",
        "scp",
        "ssh",  # create or reuse, install
        "ssh",
        "ssh",
        "ssh",
        "ssh",
        "ssh",  # tokenize x 4 workers, merge
        "ssh",
        "delete",
    ]  # train, teardown

    # create or reuse: describe first, create with the slice's type and runtime
    describe, create = commands[0][0], commands[1][0]
    assert describe[5:] == ["pianist", *where, "--format=value(state)"]
    assert create[5] == "pianist" and set(where) <= set(create)
    assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
    assert "--spot" not in create

    # install on every worker: the repo, pinned requirements + jax[tpu], gcsfuse
    assert commands[2][0][-1] == "HEAD"  # git archive HEAD (printed only)
    scp = commands[3][0]
    assert "--worker=all" in scp and "pianist:pianist-jax.tar.gz" in scp
    ssh = ssh_commands(commands)
    install_argv, install = ssh[0]
    assert worker_of(install_argv) == "all"
    assert "-r requirements.txt" in install and "-r requirements-tpu.txt" in install
    assert f"'jax[tpu]=={JAX_PIN}'" in install
    assert "install -y -qq gcsfuse" in install

    # tokenization: one command per worker, disjoint shard ranges covering all 8 shards
    tokenize = ssh[1:5]
    covered = []
    for w, (argv, remote) in enumerate(tokenize):
        assert worker_of(argv) == str(w)
        assert re.search(rf"--num-hosts 4 --host-index {w} ", remote), remote
        assert "gcloud storage rsync --recursive gs://my-bucket/data " in remote
        assert remote.rstrip().endswith("gs://my-bucket/shards/pretrain")  # uploads its shards
        assert "gs://my-bucket/shards/pretrain/manifest.json" in remote  # done: skip
        shards = host_shards(4, w, 8)
        assert f"worker {w}: shards {shards[0]}-{shards[-1]} of 8" in notes
        covered += shards
    assert sorted(covered) == list(range(8)) and len(set(covered)) == 8
    merge_argv, merge = ssh[5]
    assert worker_of(merge_argv) == "0" and "python -m data_prep.merge_manifests" in merge

    # training: the same command on all workers at once, checkpoints in the bucket
    train_ssh_argv, train = ssh[6]
    assert worker_of(train_ssh_argv) == "all"
    assert "gcsfuse --implicit-dirs" in train and ' my-bucket "$HOME/gcs"' in train
    assert 'gcloud storage rsync gs://my-bucket/shards/pretrain "$HOME/shards/pretrain"' in train
    argv = train_argv(train)
    assert argv[:7] == [
        "-m",
        "pianist_jax.train",
        "--config",
        "configs/pretrain.yaml",
        "--distributed",
        "--no-progress",
        "train.output_dir=/home/tpu/gcs/runs/pretrain",
    ]
    cfg = config_from_cli([str(REPO / "configs/pretrain.yaml"), *argv[6:]])
    assert cfg.train.output_dir == "/home/tpu/gcs/runs/pretrain"  # = gs://my-bucket/runs/pretrain
    assert [s.path for s in cfg.data.sources] == [
        "/home/tpu/shards/pretrain/shard-0000[0-6]-of-00008.array_record"
    ]
    assert [s.path for s in cfg.data.eval_sources] == [
        "/home/tpu/shards/pretrain/shard-00007-of-00008.array_record"
    ]
    assert cfg.train.steps == 12345
    assert not any(a.startswith("mesh.") for a in argv)  # the config's mesh (pod configs differ)
    assert any("gs://my-bucket/runs/pretrain/checkpoints" in n for n in notes)

    # teardown last, only because it was asked for
    assert commands[-1][0][4:] == ["delete", "pianist", *where, "--quiet"]

    for _, remote in ssh:
        subprocess.run(["bash", "-n"], input=remote, text=True, check=True)


def test_tpu_rerun_resumes_same_run_and_no_teardown_unless_asked(fake_bin, tmp_path):
    """Resume = the same command again: identical output dir, and the trainer picks the newest
    committed checkpoint under it (pianist_jax.train.checkpoint.resolve_start via train._start)."""
    first = launch(TPU, TPU_ARGS, fake_bin).stdout
    assert first == launch(TPU, TPU_ARGS, fake_bin).stdout
    commands, _ = parse(first)
    assert not any("delete" in argv for argv, _ in commands)
    argv = train_argv(ssh_commands(commands)[-1][1], home=str(tmp_path))
    assert not any(a.startswith(("train.init_from", "--overwrite")) for a in argv)
    out_dir = Path(next(a for a in argv if a.startswith("train.output_dir=")).split("=", 1)[1])

    from pianist_jax.train import checkpoint

    assert checkpoint.resolve_start(out_dir / checkpoint.RUN_SUBDIR, None).kind == "fresh"
    for step in (100, 200):
        (out_dir / checkpoint.RUN_SUBDIR / str(step)).mkdir(parents=True)
        (out_dir / checkpoint.RUN_SUBDIR / str(step) / checkpoint.COMMIT_MARKER).write_text("ok")
    (out_dir / checkpoint.RUN_SUBDIR / "300").mkdir()  # uncommitted (preempted mid-save)
    plan = checkpoint.resolve_start(out_dir / checkpoint.RUN_SUBDIR, None)
    assert (plan.kind, plan.step) == ("resume", 200)


@pytest.mark.parametrize(
    "accel, workers, runtime",
    [
        ("v4-8", 1, "tpu-ubuntu2204-base"),
        ("v4-32", 4, "tpu-ubuntu2204-base"),
        ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v5p-64", 8, "v2-alpha-tpuv5"),
        ("v6e-16", 4, "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_workers_and_runtime_from_accelerator_type(fake_bin, accel, workers, runtime):
    args = [*TPU_ARGS[:-4], "--accelerator-type", accel, "--bucket", "b"]
    commands, notes = parse(launch(TPU, args, fake_bin).stdout)
    assert f"{workers} workers" in notes[0] and f"--version={runtime}" in commands[1][0]
    tokenize = [argv for argv, remote in ssh_commands(commands) if "--host-index" in remote]
    assert [worker_of(argv) for argv in tokenize] == [str(w) for w in range(workers)]


def test_tpu_options(fake_bin):
    args = [
        *TPU_ARGS,
        "--spot",
        "--detach",
        "--stages",
        "create,train",
        "--run",
        "r2",
        "--shards",
        "gs://other/shards",
    ]
    commands, _ = parse(launch(TPU, args, fake_bin).stdout)
    assert [argv[4] for argv, _ in commands] == ["describe", "create", "ssh"]
    assert "--spot" in commands[1][0]
    train = commands[2][1]
    assert "nohup python -m pianist_jax.train" in train and '"$HOME/train-r2.log"' in train
    assert "gcloud storage rsync gs://other/shards " in train
    assert "train.output_dir=/home/tpu/gcs/runs/r2" in train_argv(train)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dry-run", "--name", "p", "--accelerator-type", "v4-8", "--bucket", "b"], "--zone"),
        (["--dry-run", "--name", "p", "--zone", "z", "--accelerator-type", "v4-8"], "gs://BUCKET"),
        ([*TPU_ARGS, "--stages", "train,bogus"], "--stages"),
        ([*TPU_ARGS, "--detach", "--teardown"], "--detach"),
    ],
)
def test_tpu_rejects_bad_arguments(fake_bin, args, message):
    result = launch(TPU, args, fake_bin, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_tpu_dry_run_output_is_runnable_bash(fake_bin, tmp_path):
    """Without the leading '+ ', the printed commands paste into bash and pass gcloud exactly
    the arguments (remote scripts included) that the parser read."""
    stdout = launch(TPU, TPU_ARGS, fake_bin).stdout
    commands, _ = parse(stdout)
    record = tmp_path / "record"
    record.mkdir()
    fake = (
        'gcloud() { n=$(ls "$REC" | wc -l); printf "%s\\0" "$@" > "$REC/$n"; }\n'
        'git() { gcloud git "$@"; }\n'
    )
    script = fake + "\n".join(line.removeprefix("+ ") for line in stdout.splitlines())
    subprocess.run(
        ["bash", "-c", script], env={"REC": str(record), "PATH": os.environ["PATH"]}, check=True
    )
    replayed = [(record / str(i)).read_text().split("\0")[:-1] for i in range(len(commands))]
    expected = [argv[1:] if argv[0] == "gcloud" else ["git", *argv[1:]] for argv, _ in commands]
    for (argv, remote), got, want in zip(commands, replayed, expected, strict=True):
        assert got == want + ([f"--command={remote}"] if remote is not None else [])


def test_tpu_help(fake_bin):
    text = launch(TPU, ["--help"], fake_bin).stdout
    assert "--dry-run" in text and "--teardown" in text and "gcsfuse" in text


# --------------------------------------------------------------------------- GPU


def gpu_argv(fake_bin, env):
    out = launch(
        GPU, ["--dry-run", "train.steps=7777"], fake_bin, env={"OUT": "/shared/run", **env}
    )
    return shlex.split(out.stdout)


def test_gpu_single_node(fake_bin):
    argv = gpu_argv(fake_bin, {})
    assert argv[:5] == ["python", "-m", "pianist_jax.train", "--config", "configs/pretrain.yaml"]
    assert not any(a.startswith(("--coordinator", "--distributed")) for a in argv)
    cfg = config_from_cli([str(REPO / argv[4]), *argv[5:]])
    assert cfg.train.output_dir == "/shared/run" and cfg.train.steps == 7777
    assert cfg.data.sources[0].path == "out/shards/pretrain/shard-0000[0-6]-of-00008.array_record"


SLURM = {
    "SLURM_JOB_ID": "42",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_NNODES": "4",
    "SLURM_PROCID": "2",
    "SLURM_JOB_NODELIST": "gpu[03-06]",
}


def test_gpu_slurm(fake_bin):
    if shutil.which("scontrol") is None:  # the node-list fallback parser
        argv = gpu_argv(fake_bin, SLURM)
        assert argv[5:11] == [
            "--coordinator",
            "gpu03:12355",
            "--num-processes",
            "4",
            "--process-id",
            "2",
        ]
    scontrol = fake_bin[0] / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$3" = "gpu[03-06]" ] && printf "gpu03\\ngpu04\\n"\n')
    scontrol.chmod(0o755)
    argv = gpu_argv(fake_bin, {**SLURM, "SLURM_PROCID": "3", "COORDINATOR_PORT": "999"})
    assert argv[5:11] == ["--coordinator", "gpu03:999", "--num-processes", "4", "--process-id", "3"]
    # the batch script itself (no srun step) and one-task steps stay single-process
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    assert "--coordinator" not in gpu_argv(fake_bin, batch)
    assert "--coordinator" not in gpu_argv(fake_bin, {**SLURM, "SLURM_NTASKS": "1"})
    many = launch(
        GPU, ["--dry-run"], fake_bin, check=False, env={"OUT": "/o", **SLURM, "SLURM_NTASKS": "8"}
    )
    assert many.returncode == 2 and "one task per node" in many.stderr


def test_gpu_explicit_coordinator_wins(fake_bin):
    argv = gpu_argv(
        fake_bin, {**SLURM, "COORDINATOR": "head:1234", "NUM_NODES": "2", "NODE_RANK": "1"}
    )
    assert argv[5:11] == ["--coordinator", "head:1234", "--num-processes", "2", "--process-id", "1"]


@pytest.mark.parametrize(
    "state, first_calls",
    [
        ("READY", ["describe"]),
        ("", ["describe", "create"]),
        ("STOPPED", ["describe", "start"]),
        ("PREEMPTED", ["describe", "delete", "create"]),
    ],
)
def test_tpu_real_run_with_fake_gcloud(tmp_path, state, first_calls):
    """Without --dry-run (gcloud and git faked): create-or-reuse by state, the parallel
    per-worker tokenization, and a failing worker stopping the run before training."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"""#!/usr/bin/env bash
w=""; for a in "$@"; do [[ "$a" == --worker=* ]] && w="${{a#--worker=}}"; done
echo "$4${{w:+ $w}}" >> "{calls}"
[[ "$4" == describe && -n "$STATE" ]] && echo "$STATE"
[[ "$4" == describe && -z "$STATE" ]] && exit 1
[[ "$4 $w" == "ssh ${{FAIL_WORKER:-}}" ]] && exit 1
exit 0
""")
    (bin_dir / "git").write_text(f'#!/bin/sh\necho "git $3" >> "{calls}"\n')
    for tool in ("gcloud", "git"):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STATE=state, TMPDIR=str(tmp_path))
    args = [a for a in TPU_ARGS if a != "--dry-run"] + ["--teardown"]
    subprocess.run(["bash", str(TPU), *args], env=env, capture_output=True, check=True, timeout=30)
    log = calls.read_text().splitlines()
    assert log[: len(first_calls)] == first_calls
    rest = log[len(first_calls) :]
    assert rest[:4] == ["git status", "git archive", "scp all", "ssh all"]
    assert sorted(rest[4:8]) == ["ssh 0", "ssh 1", "ssh 2", "ssh 3"]
    assert rest[8:] == ["ssh 0", "ssh all", "delete"]

    calls.unlink()
    result = subprocess.run(
        ["bash", str(TPU), *args],
        env={**env, "FAIL_WORKER": "2"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "tokenization failed" in result.stderr
    log = calls.read_text().splitlines()
    assert log.count("ssh all") == 1 and sorted(log[-4:]) == ["ssh 0", "ssh 1", "ssh 2", "ssh 3"]
    assert "delete" not in log[len(first_calls) :]  # no merge, training or teardown after it
