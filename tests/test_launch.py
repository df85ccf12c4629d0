"""launch/: each script's --dry-run commands, its refusals (exit 2), --help, shellcheck, and the BTX
driver's order (seed, branches together, mix, finetune, report; done stages skipped), run as
subprocesses with a clean environment whose PATH holds no gcloud, xpk or sbatch (fakes where a
test runs a script for real)."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["tpu_pod.sh", "gke_xpk.sh", "slurm.sh", "btx.sh"]
TPU = {"PROJECT": "my-proj", "ZONE": "us-east5-a", "TPU_NAME": "btx-seed", "ACCELERATOR_TYPE": "v5p-128"}
GKE = {"PROJECT": "my-proj", "ZONE": "us-east5-a", "CLUSTER": "my-cluster", "WORKLOAD": "btx-seed", "TPU_TYPE": "v5p-128"}
TRAIN = ["btx_jax.train", "--config=configs/llama2_7b.py", "--workdir=gs://b/runs/it's seed"]


@pytest.fixture
def sh(tmp_path):
    """Runs a launch script; PATH is a folder with bash, env, dirname and python3 only (plus the given fakes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    os.symlink(os.path.realpath(sys.executable), bin_dir / "python3")  # the interpreter, not a pyenv shim

    def run(script, *args, env=(), fakes=None, system_path=False):
        for name, body in (fakes or {}).items():
            (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
            (bin_dir / name).chmod(0o755)
        path = str(bin_dir) + (":/usr/bin:/bin" if system_path else "")
        full_env = {"PATH": path, "HOME": str(tmp_path), "TMPDIR": str(tmp_path), **dict(env)}
        return subprocess.run([os.path.join(LAUNCH, script), *args], env=full_env, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
    return run


def commands(stdout):
    """The printed `+ ` command lines, split as the shell would."""
    return [shlex.split(line[2:].split("   #")[0]) for line in stdout.splitlines() if line.startswith("+ ")]


def find(cmds, *words):
    """The commands holding every one of the words (as whole arguments)."""
    return [c for c in cmds if all(w in c for w in words)]


def option(cmd, name):
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


# ------------------------------------------------------------------------------------ tpu_pod.sh

@pytest.mark.parametrize("by", ["env", "flags"])
def test_tpu_pod_creates_copies_installs_and_runs_on_all_workers(sh, by):
    flags = ["--project=my-proj", "--zone=us-east5-a", "--name=btx-seed", "--accelerator-type=v5p-128"]
    result = sh("tpu_pod.sh", "--dry-run", *flags, "--", *TRAIN) if by == "flags" else \
        sh("tpu_pod.sh", "--dry-run", *TRAIN, env=TPU)
    cmds = commands(ok(result))
    where = ["--zone=us-east5-a", "--project=my-proj"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "btx-seed", *where]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "btx-seed", *where,
                       "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]
    pack = cmds[2]
    assert pack[:3] == ["cd", REPO, "&&"] and "git" in pack and "tar" in pack
    tarball = pack[pack.index("-czf") + 1]
    assert cmds[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "btx-seed:btx_jax.tar.gz", *where,
                       "--worker=all"]
    setup, job = cmds[4], cmds[5]
    for ssh in (setup, job):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "btx-seed"] and "--worker=all" in ssh
    install = option(setup, "--command")
    assert "bash scripts/make_venv.sh ~/btx_venv" in install and "pip install -q -e . 'jax[tpu]'" in install
    assert shlex.split(option(job, "--command")) == [
        "cd", "btx_jax", "&&", "BTX_DISTRIBUTED=1", "~/btx_venv/bin/python", "-m", *TRAIN]
    assert len(cmds) == 6  # no delete without --delete


def test_tpu_pod_queued_resource_and_multislice(sh):
    out = ok(sh("tpu_pod.sh", "--dry-run", "--queued", "--delete", "--version=v2-custom", *TRAIN, env=TPU))
    cmds = commands(out)
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    create, = find(cmds, "create")
    assert create[:6] == [*qr, "create", "btx-seed"] and "--node-id=btx-seed" in create
    assert "--runtime-version=v2-custom" in create and "--accelerator-type=v5p-128" in create
    assert find(cmds, "describe", "--format=value(state.state)"), "waits for the queued resource to be ACTIVE"
    assert all("--node=all" in c and "--worker=all" in c for c in find(cmds, "ssh") + find(cmds, "scp"))
    assert cmds[-1] == [*qr, "delete", "btx-seed", "--zone=us-east5-a", "--project=my-proj", "--force", "--quiet"]

    cmds = commands(ok(sh("tpu_pod.sh", "--dry-run", "--num-slices=4", *TRAIN, env=TPU)))
    create, = find(cmds, "create")
    assert create[:4] == qr and "--node-count=4" in create and "--node-prefix=btx-seed" in create
    assert not find(cmds, "delete")
    job = find(cmds, "ssh")[-1]
    assert "--node=all" in job
    assert shlex.split(option(job, "--command"))[-2:] == [TRAIN[-1], "--config.mesh.data=4"]
    # a command that sets the data axis itself keeps it; a non-btx_jax module gets nothing
    for command, tail in (([*TRAIN, "--config.mesh.data=2"], "--config.mesh.data=2"), (["other.mod", "x"], "x")):
        job = find(commands(ok(sh("tpu_pod.sh", "--dry-run", "--num-slices=4", *command, env=TPU))), "ssh")[-1]
        assert shlex.split(option(job, "--command"))[-1] == tail


def test_tpu_pod_for_real_with_a_fake_gcloud(sh, tmp_path):
    """Not a dry run: an existing TPU is not created again; a queued one is waited for; the tarball holds the checkout."""
    log = tmp_path / "gcloud.log"
    fake = (f'printf "%s\\n" "$*" >> {log}\n'
            'if [[ $* == *" describe "*--format* ]]; then  # a queued resource: waiting the first time, then active\n'
            '  [[ -e $TMPDIR/asked ]] && echo ACTIVE || { echo WAITING_FOR_RESOURCES; touch "$TMPDIR/asked"; }\n'
            'elif [[ $* == *" describe "* ]]; then exit "${MISSING:-0}"\n'
            'elif [[ $* == *" scp "* ]]; then cp "$5" "$TMPDIR/copied.tar.gz"; fi\n')
    fakes = {"gcloud": fake, "sleep": f'echo "sleep $*" >> {log}\n'}
    ok(sh("tpu_pod.sh", *TRAIN, env=TPU, fakes=fakes, system_path=True))
    assert [c.split()[2:4] for c in log.read_text().splitlines()] == [
        ["tpu-vm", "describe"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    with tarfile.open(tmp_path / "copied.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"setup.py", "launch/tpu_pod.sh", "scripts/make_venv.sh", "btx_jax/distributed.py"} <= names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)

    log.unlink()
    ok(sh("tpu_pod.sh", "--queued", *TRAIN, env={**TPU, "MISSING": "1"}, fakes=fakes, system_path=True))
    calls = log.read_text().splitlines()
    assert [c.split()[2:4] for c in calls[:4]] == [["queued-resources", "describe"], ["queued-resources", "create"],
                                                   ["queued-resources", "describe"], []]
    assert calls[3] == "sleep 60" and calls[4].split()[2:4] == ["queued-resources", "describe"]
    assert [c.split()[3] for c in calls[5:]] == ["scp", "ssh", "ssh"]


# ------------------------------------------------------------------------------------ gke_xpk.sh

def test_gke_xpk_workload(sh):
    cmds = commands(ok(sh("gke_xpk.sh", "--dry-run", "--num-slices=2", "--wait", *TRAIN, env=GKE)))
    create, = find(cmds, "xpk", "create")
    assert create[:3] == ["xpk", "workload", "create"]
    for flag, value in (("--cluster", "my-cluster"), ("--workload", "btx-seed"), ("--tpu-type", "v5p-128"),
                        ("--num-slices", "2"), ("--project", "my-proj"), ("--zone", "us-east5-a"),
                        ("--base-docker-image", "python:3.12")):
        assert option(create, flag) == value
    context = option(create, "--script-dir")
    assert find(cmds, "tar", "-C", context), "the image is built from a copy of the checkout"
    assert shlex.split(option(create, "--command")) == [
        "pip", "install", "-q", "-e", ".", "jax[tpu]", "&&", "BTX_DISTRIBUTED=1", "python", "-m", *TRAIN,
        "--config.mesh.data=2"]
    assert cmds[-1] == ["xpk", "workload", "list", "--cluster=my-cluster", "--project=my-proj", "--zone=us-east5-a",
                        "--wait-for-job-completion=btx-seed"]

    cmds = commands(ok(sh("gke_xpk.sh", "--dry-run", "--docker-image=gcr.io/p/btx:1", *TRAIN, env=GKE)))
    assert [c[:3] for c in cmds] == [["xpk", "workload", "delete"], ["xpk", "workload", "create"]]
    assert option(cmds[1], "--docker-image") == "gcr.io/p/btx:1"
    assert shlex.split(option(cmds[1], "--command")) == ["BTX_DISTRIBUTED=1", "python", "-m", *TRAIN]


def test_gke_xpk_for_real_with_a_fake_xpk(sh, tmp_path):
    """Not a dry run: the image's folder holds the checkout when xpk runs; a failed workload fails the script."""
    log = tmp_path / "xpk.log"
    fake = (f'printf "%s\\n" "$*" >> {log}\n'
            'if [[ $2 == create ]]; then dir=$(printf "%s\\n" "$@" | grep -- --script-dir= | cut -d= -f2)\n'
            '  ls -a "$dir" > "$TMPDIR/context.txt"; fi\n'
            '[[ $2 != list ]] || exit "${WORKLOAD_STATUS:-0}"\n')
    ok(sh("gke_xpk.sh", "--wait", *TRAIN, env=GKE, fakes={"xpk": fake}, system_path=True))
    assert [c.split()[:2] for c in log.read_text().splitlines()] == [
        ["workload", "delete"], ["workload", "create"], ["workload", "list"]]
    context = (tmp_path / "context.txt").read_text().split()
    assert {"setup.py", "btx_jax", "launch", "scripts"} <= set(context) and ".venv" not in context
    result = sh("gke_xpk.sh", "--wait", *TRAIN, env={**GKE, "WORKLOAD_STATUS": "125"}, fakes={"xpk": fake},
                system_path=True)
    assert result.returncode == 125


def test_gke_xpk_refuses_a_name_xpk_would_refuse(sh):
    result = sh("gke_xpk.sh", "--dry-run", "--name=Branch/Code", *TRAIN, env=GKE)
    assert result.returncode == 2 and "workload name 'Branch/Code'" in result.stderr


# -------------------------------------------------------------------------------------- slurm.sh

def sbatch_file(stdout):
    """The script slurm.sh writes (printed as a heredoc in a dry run)."""
    body = stdout.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    return body.splitlines()


@pytest.mark.parametrize("per_node", [False, True])
def test_slurm_script_and_submission(sh, tmp_path, per_node):
    flags = ["--name=btx-seed", "--nodes=4", "--gpus-per-node=8", "--time=24:00:00", "--partition=gpu",
             "--account=lab", "--wait", f"--out-dir={tmp_path}/out"] + (["--per-node"] if per_node else [])
    out = ok(sh("slurm.sh", "--dry-run", *flags, "--", "python", "-m", *TRAIN))
    lines = sbatch_file(out)
    assert lines[0] == "#!/bin/bash"
    assert {"#SBATCH --job-name=btx-seed", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8",
            f"#SBATCH --ntasks-per-node={1 if per_node else 8}", "#SBATCH --time=24:00:00",
            "#SBATCH --partition=gpu", "#SBATCH --account=lab",
            f"#SBATCH --output={tmp_path}/out/%x-%j.out", f"cd {REPO}"} <= set(lines)
    srun = shlex.split(lines[-1])
    python = os.path.join(REPO, ".venv", "bin", "python")
    if per_node:
        assert any(line.startswith("export JAX_COORDINATOR_ADDRESS=") for line in lines)
        assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"] and "env -u SLURM_LOCALID" in srun[4]
        assert srun[5:] == ["_", python, "-m", *TRAIN]
    else:
        assert srun == ["srun", "--kill-on-bad-exit=1", python, "-m", *TRAIN]
    assert commands(out)[-1] == ["sbatch", "--wait", f"{tmp_path}/out/btx-seed.sbatch"]
    script = tmp_path / "job.sbatch"
    script.write_text("\n".join(lines) + "\n")
    check = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


# ---------------------------------------------------------------------------- refusals, help, lint

MISSING = [
    ("tpu_pod.sh", TPU, "PROJECT", "--project"), ("tpu_pod.sh", TPU, "ZONE", "--zone"),
    ("tpu_pod.sh", TPU, "TPU_NAME", "--name"), ("tpu_pod.sh", TPU, "ACCELERATOR_TYPE", "--accelerator-type"),
    ("gke_xpk.sh", GKE, "PROJECT", "--project"), ("gke_xpk.sh", GKE, "ZONE", "--zone"),
    ("gke_xpk.sh", GKE, "CLUSTER", "--cluster"), ("gke_xpk.sh", GKE, "WORKLOAD", "--name"),
    ("gke_xpk.sh", GKE, "TPU_TYPE", "--tpu-type"), ("slurm.sh", {"JOB_NAME": "x"}, "JOB_NAME", "--name"),
]


@pytest.mark.parametrize("script,env,var,flag", MISSING, ids=[f"{m[0]}-{m[2]}" for m in MISSING])
def test_a_missing_setting_is_refused_with_how_to_give_it(sh, script, env, var, flag):
    result = sh(script, "--dry-run", *TRAIN, env={k: v for k, v in env.items() if k != var})
    assert result.returncode == 2 and result.stdout == ""
    assert "error: no " in result.stderr and f"{flag}=" in result.stderr and f"{var}=" in result.stderr


@pytest.mark.parametrize("script,env,tool", [("tpu_pod.sh", TPU, "gcloud"), ("gke_xpk.sh", GKE, "xpk"),
                                             ("slurm.sh", {"JOB_NAME": "x"}, "sbatch")])
def test_a_missing_tool_is_refused_unless_dry_run(sh, script, env, tool):
    result = sh(script, *TRAIN, env=env)
    assert result.returncode == 2 and f"{tool} not found on PATH" in result.stderr and "fix:" in result.stderr
    assert result.stdout == ""


def test_bad_options_are_refused(sh):
    for args, message in ((["--nope", *TRAIN], "unknown option --nope"), (["--zone"], "--zone needs a value"),
                          (["--queued=1", *TRAIN], "--queued takes no value"), ([], "no command given")):
        result = sh("tpu_pod.sh", "--dry-run", *args, env=TPU)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(sh, script):
    out = ok(sh(script, "--help"))
    assert f"launch/{script}" in out and "Options" in out and "--dry-run" in out and not out.startswith("#")


def shellcheck():
    return os.path.join(os.path.dirname(sys.executable), "shellcheck")


def test_shellcheck_passes_on_every_script():
    scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if f.endswith(".sh"))
    assert len(scripts) == len(SCRIPTS) + 1  # and common.sh
    result = subprocess.run([shellcheck(), *scripts], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------------- btx.sh

def stage(name, group, inputs=(), done=False, devices=64, kind="train"):
    command = ["python", "-m", "btx_jax.recipe", "--config=configs/llama2_7b.py", "--workdir=gs://b/runs/btx",
               f"--stage={name}"]
    return {"name": name, "kind": kind, "inputs": list(inputs), "group": group, "command": command,
            "mesh": {"data": 1, "fsdp": devices, "expert": 1, "tensor": 1}, "devices": devices, "steps": 100,
            "tokens": 409600, "flops": 1e15, "estimated_seconds": 600.0, "done": done}


def plan_file(tmp_path, done=()):
    branches = ["branch/code", "branch/math"]
    stages = [stage("seed", 0), *[stage(b, 1, ["seed"]) for b in branches],
              stage("mix", 2, ["seed", *branches], kind="mix"), stage("baseline/upcycle_mix", 2, ["seed"], kind="mix"),
              stage("finetune", 3, ["mix"]), stage("baseline/dense", 3, ["seed"]),
              stage("report", 4, ["finetune", "baseline/dense"], devices=1, kind="report")]
    for s in stages:
        s["done"] = s["name"] in done
    plan = {"config": "configs/llama2_7b.py", "workdir": "gs://b/runs/btx", "target": "v5p-128", "stages": stages,
            "groups": [["seed"], branches, ["mix", "baseline/upcycle_mix"], ["finetune", "baseline/dense"], ["report"]],
            "estimated_seconds": 3000.0}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def launches(stdout):
    """(group, stage) of each stage the driver launches, in order, from its `# group G: STAGE on NAME` lines."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("# group ") and " on " in line:
            group, rest = line[len("# group "):].split(": ", 1)
            found.append((int(group), rest.split(" on ")[0]))
    return found


def assert_btx_order(found, branches):
    order = [s for _, s in found]
    group = dict((s, g) for g, s in found)
    assert order[0] == "seed" and order[-1] == "report"
    assert {group[b] for b in branches} == {group["seed"] + 1}, "every branch in the group after the seed"
    assert group["mix"] > group[branches[0]] and group["finetune"] > group["mix"]
    assert all(group["report"] > g for s, g in group.items() if s != "report")


@pytest.mark.parametrize("backend,env", [("tpu", {"PROJECT": "p", "ZONE": "z"}),
                                         ("gke", {"PROJECT": "p", "ZONE": "z", "CLUSTER": "c"}),
                                         ("slurm", {})])
def test_btx_driver_runs_the_groups_in_order(sh, tmp_path, backend, env):
    out = ok(sh("btx.sh", f"--backend={backend}", f"--plan-file={plan_file(tmp_path)}", "--prefix=exp1", "--dry-run",
                env=env))
    assert_btx_order(launches(out), ["branch/code", "branch/math"])
    assert "# group 1: branch/code branch/math at the same time" in out
    script = {"tpu": "tpu_pod.sh", "gke": "gke_xpk.sh", "slurm": "slurm.sh"}[backend]
    launched = [c for c in commands(out) if c[0].endswith("/" + script)]
    assert [option(c, "--name") for c in launched] == [
        "exp1-seed", "exp1-branch-code", "exp1-branch-math", "exp1-mix", "exp1-baseline-upcycle-mix", "exp1-finetune",
        "exp1-baseline-dense", "exp1-report"]
    for c in launched:
        assert c[c.index("--") + 1:][:3] == ["python", "-m", "btx_jax.recipe"]
        assert c[-1] == "--stage=" + launches(out)[launched.index(c)][1]
    if backend == "tpu":
        assert all(option(c, "--accelerator-type") == "v5p-128" for c in launched)
        assert "[branch/math] + gcloud compute tpus tpu-vm create exp1-branch-math" in out  # the backend's dry run
    if backend == "slurm":
        assert [(option(c, "--nodes"), option(c, "--gpus-per-node")) for c in launched][-2:] == [("8", "8"), ("1", "1")]


def test_btx_driver_resumes_skipping_done_stages(sh, tmp_path):
    out = ok(sh("btx.sh", "--backend=slurm", f"--plan-file={plan_file(tmp_path, done={'seed', 'branch/code'})}",
                "--dry-run"))
    assert "# group 0: seed is done, skipped" in out and "# group 1: branch/code is done, skipped" in out
    assert [s for _, s in launches(out)][:2] == ["branch/math", "mix"]
    assert not [c for c in commands(out) if "--stage=seed" in c or "--stage=branch/code" in c]


def test_btx_driver_passes_backend_options_and_refuses_missing_ones(sh, tmp_path):
    plan = f"--plan-file={plan_file(tmp_path)}"
    out = ok(sh("btx.sh", "--backend=tpu", plan, "--dry-run", "--", "--project=p", "--zone=z", "--queued"))
    assert "[seed] + gcloud compute tpus queued-resources create exp1-seed" not in out
    assert "[seed] + gcloud compute tpus queued-resources create btx-seed" in out
    result = sh("btx.sh", "--backend=tpu", plan, "--dry-run", env={"ZONE": "z"})
    assert result.returncode == 2 and "no GCP project given" in result.stderr and "--project=" in result.stderr
    result = sh("btx.sh", "--backend=tpu", plan, env={"ZONE": "z"})  # checked before anything is launched
    assert result.returncode == 2 and "no GCP project given" in result.stderr and "+ " not in result.stdout
    for args, message in ((["--dry-run", plan], "no backend given"), (["--backend=aws", plan], "unknown backend"),
                          (["--backend=tpu"], "no recipe config given")):
        result = sh("btx.sh", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr


FAKE_SBATCH = """
# fake `sbatch --wait FILE`: logs the job's start and end; a branch waits until both branches have started.
job="$(basename "${@: -1}" .sbatch)"
echo "start $job" >> "$JOBS"
if [[ $job == btx-branch-* ]]; then
  for _ in $(seq 300); do [[ $(grep -c "start btx-branch" "$JOBS") == 2 ]] && break; sleep 0.1; done
  [[ $(grep -c "start btx-branch" "$JOBS") == 2 ]] || { echo "the other branch did not start"; exit 1; }
fi
echo "end $job" >> "$JOBS"
[[ $job != "${FAIL:-}" ]]
"""


def test_btx_driver_for_real_runs_branches_together_and_stops_on_a_failure(sh, tmp_path):
    jobs = tmp_path / "jobs.log"
    args = ["--backend=slurm", f"--plan-file={plan_file(tmp_path, done={'baseline/upcycle_mix'})}", "--",
            f"--out-dir={tmp_path}/slurm", f"--python={sys.executable}"]
    result = sh("btx.sh", *args, env={"JOBS": str(jobs)}, fakes={"sbatch": FAKE_SBATCH}, system_path=True)
    assert ok(result).rstrip().endswith("# all stages done")
    log = jobs.read_text().split("\n")
    assert log[:2] == ["start btx-seed", "end btx-seed"]
    assert sorted(log[2:4]) == ["start btx-branch-code", "start btx-branch-math"]
    assert sorted(log[4:6]) == ["end btx-branch-code", "end btx-branch-math"]
    assert log[6:8] == ["start btx-mix", "end btx-mix"]
    assert log[-3:] == ["start btx-report", "end btx-report", ""]
    assert "start btx-baseline-upcycle-mix" not in log
    assert (tmp_path / "slurm" / "btx-mix.sbatch").exists()

    jobs.unlink()
    result = sh("btx.sh", *args, env={"JOBS": str(jobs), "FAIL": "btx-branch-math"}, fakes={"sbatch": FAKE_SBATCH},
                system_path=True)
    assert result.returncode == 1 and "branch/math failed" in result.stderr and "rerun" in result.stderr
    assert "start btx-mix" not in jobs.read_text() and "end btx-branch-code" in jobs.read_text()


@pytest.mark.parametrize("backend", ["gke", "slurm"])
def test_btx_driver_with_the_recipes_own_plan(sh, tmp_path, backend):
    """The plan from `python -m btx_jax.recipe --plan --plan_format=json` on the tiny demo config."""
    env = {"PROJECT": "p", "ZONE": "z", "CLUSTER": "c", "TPU_TYPE": "v5litepod-8", "JAX_PLATFORMS": "cpu"}
    overrides = ["--config.recipe.target=8xH100"] if backend == "slurm" else []
    out = ok(sh("btx.sh", f"--backend={backend}", "--config=configs/btx_demo.py:tiny", f"--workdir={tmp_path}/btx",
                *overrides, f"--python={sys.executable}", "--dry-run", env=env))
    plan_line, = [line for line in out.splitlines() if line.startswith("# plan: ")]
    tail = [*overrides, "--plan", "--plan_format=json"]
    assert shlex.split(plan_line[len("# plan: "):])[-len(tail):] == tail
    found = launches(out)
    branches = [s for _, s in found if s.startswith("branch/")]
    assert len(branches) >= 2
    assert_btx_order(found, branches)
    script = {"gke": "gke_xpk.sh", "slurm": "slurm.sh"}[backend]
    launched = [c for c in commands(out) if c[0].endswith("/" + script)]
    assert len(launched) == len(found) and all("--wait" in c for c in launched)
    if backend == "slurm":  # the target's 8 GPUs on one node, and the override in every stage's command
        assert all(option(c, "--nodes") == "1" and option(c, "--gpus-per-node") == "8" for c in launched)
        assert all("--config.recipe.target=8xH100" in c for c in launched)
        srun = [line for line in out.splitlines() if line.startswith("[seed] srun ")]
        assert srun and "--stage=seed" in srun[0]
