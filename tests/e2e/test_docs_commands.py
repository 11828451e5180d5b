"""Every command in README.md and docs/*.md is run here, as written, against the session's
real local Ray head and S3 server; a documented command that no test runs fails the suite."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import LAUNCH, README_LORA, REPO, output

pytestmark = pytest.mark.integration
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Commands that a test cannot run inside the test suite, and what runs them instead.
RUN_ELSEWHERE = {
    "bash .ci/setup && .venv/bin/python -m pytest -q": ".ci/run (it is CI's test command)",
    "bash .ci/setup": "every other README command and .ci/run",
    ". .venv/bin/activate": "a shell builtin; the tests call the same .venv's launcher",
    "launch down local": "the launch_home fixture's teardown, which asserts it",
    "launch schema --markdown > docs/run-spec.md": "test_run_spec_page_is_current",
    # these need a real Kubernetes cluster with KubeRay (none can run here)
    "launch up prod": "tests/k8s/test_live_cluster.py (pytest -m k8s, KUBECONFIG)",
    "launch status prod": "tests/k8s/test_live_cluster.py (pytest -m k8s, KUBECONFIG)",
    "launch configs/examples/prod_sft.yaml --cluster prod": "tests/k8s/test_live_cluster.py (pytest -m k8s, KUBECONFIG)",
    "launch configs/examples/prod_sft.yaml --cluster prod --ephemeral": "tests/k8s/test_live_cluster.py (pytest -m k8s, KUBECONFIG)",
    "launch down prod": "tests/k8s/test_live_cluster.py (pytest -m k8s, KUBECONFIG)",
    # docs/aws.md: against moto on 127.0.0.1, as far as moto goes (its instances never boot: the
    # head is launched, SSH never comes up); the rest needs a real AWS account
    "launch up aws-dev": "tests/integration/test_aws_cli.py::test_up_status_run_down_against_moto",
    "launch status aws-dev": "tests/integration/test_aws_cli.py::test_up_status_run_down_against_moto",
    "launch down aws-dev": "tests/integration/test_aws_cli.py::test_up_status_run_down_against_moto",
    "launch run configs/examples/prod_sft.yaml --cluster aws-dev":
        "a real AWS account (nodes that boot, SSH, the Jobs API over the tunnel, GPUs); "
        "tests/integration/test_aws_cli.py runs it against moto up to `up` (pre-flight, capacity, the head)",
    # a GPU cluster that reaches the hub and S3: the render test checks what it would apply, a
    # search itself runs in tests/integration/test_tune.py, a run on KubeRay in tests/k8s
    "launch configs/examples/prod_tune.yaml --cluster prod": "test_kubernetes_doc_render_commands + test_tune.py",
    "launch configs/examples/tune_lora.yaml": "tests/integration/test_tune.py (the run on the session's S3 server)",
    # docs/methods.md: each example is trained by the integration test of its method (a few steps)
    "launch configs/examples/sft_sharegpt.yaml": "test_training.py::test_each_chat_format_example_trains_end_to_end",
    "launch configs/examples/pretrain.yaml": "test_training.py::test_pretrain_on_local_storage_stops_early_with_a_checkpoint_and_a_model",
    "launch configs/examples/pretrain_corpus.yaml": "test_pretrain_corpus.py (replay share, held-out text)",
    "launch configs/examples/pretrain_stream.yaml": "test_pretrain_corpus.py (streamed, resumed mid-stream)",
    "launch configs/examples/reward.yaml": "test_preference.py (as shipped)",
    "launch configs/examples/ranking.yaml": "test_preference.py (as shipped)",
    "launch configs/examples/dpo.yaml": "test_preference.py (as shipped)",
    "launch configs/examples/multitask.yaml": "test_multitask.py (one whole epoch of a smaller mixture)",
    "launch configs/examples/transfer.yaml": "test_transfer.py (the child of a quickstart parent on S3)",
    "launch configs/examples/fewshot.yaml": "test_fewshot_run.py (the example as shipped)",
    "launch configs/examples/qlora.yaml": "test_qlora_train.py",
    "launch configs/examples/grpo.yaml": "test_ppo.py (as shipped, with spread roles)",
    "launch configs/examples/ppo.yaml": "test_ppo.py (as shipped, an actor worker killed mid-run)",
    "launch configs/examples/esft.yaml": "test_esft_train.py (as shipped, and resumed)",
    "launch apply-delta <RUN>/esft/experts.safetensors --out merged/": "test_esft_train.py (delta == export)",
}


def documented_commands() -> list[str]:
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                line = re.sub(r"\s{2,}#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    commands.append(line)
    return commands


TESTED = {
    "bash .ci/setup && .venv/bin/launch configs/examples/quickstart.yaml",
    "launch validate configs/examples/lora.yaml",
    README_LORA,  # conftest.readme_lora_run
    "launch status",
    "launch schema > run.schema.json",
    "launch configs/examples/quickstart.yaml",  # the README's first command runs it (`launch` is .venv/bin/launch)
    "launch configs/examples/quickstart.yaml --detach",
    "launch logs <JOB> -f",
    "launch cancel <JOB>",
    "export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...",
    "launch configs/examples/quickstart.yaml checkpoint.storage=s3://my-bucket/runs",
    "launch render configs/examples/prod_sft.yaml --cluster prod",
    "launch render configs/examples/prod_sft.yaml --cluster prod --ephemeral",
    "launch render configs/examples/prod_tune.yaml --cluster prod",
    "launch render configs/examples/prod_sft.yaml --cluster aws-dev",
}


def test_every_documented_command_is_run_by_a_test():
    untested = [c for c in documented_commands() if c not in TESTED and c not in RUN_ELSEWHERE]
    assert not untested, f"documented but not run by any test: {untested}"


def shell(command: str, home: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 900):
    """Run a documented command with `launch` meaning this venv's launcher."""
    full_env = {**os.environ, "LLMLAUNCH_HOME": home, **(env or {})}
    full_env["PATH"] = f"{REPO / '.venv' / 'bin'}:{full_env['PATH']}"
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, output(proc)[-4000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def readme_quickstart(launch_home):
    """The README's first command, run once: its test reads it, and the detached run of the
    same spec below must start fresh after it (a finished run is never resumed)."""
    readme_first = documented_commands()[0]
    assert readme_first == "bash .ci/setup && .venv/bin/launch configs/examples/quickstart.yaml"
    return shell(readme_first, launch_home)


def test_readme_quickstart_command_trains_and_exports(readme_quickstart, launch_home):
    proc = readme_quickstart
    assert_ok(proc)
    assert re.search(r"job quickstart-\S+ succeeded", proc.stderr)
    models = list(Path(launch_home, "runs", "quickstart").glob("*/model/model.safetensors"))
    assert models, output(proc)[-2000:]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(models[-1].parent)


def test_readme_usage_commands(readme_lora_run, launch_home, tmp_path):
    assert_ok(shell("launch validate configs/examples/lora.yaml", launch_home))
    proc = readme_lora_run  # `launch configs/examples/lora.yaml train.max_steps=10` (conftest.README_LORA)
    assert_ok(proc)
    assert list(Path(launch_home, "runs", "quickstart-lora").glob("*/adapter/adapter_config.json"))
    status = shell("launch status", launch_home)
    assert_ok(status)
    assert "quickstart-lora-" in status.stderr and "SUCCEEDED" in status.stderr
    assert_ok(shell("launch schema > run.schema.json", launch_home, cwd=tmp_path))
    assert json.loads((tmp_path / "run.schema.json").read_text())["$defs"]


def test_quickstart_doc_detach_follow_ctrl_c_cancel(readme_quickstart, launch_home):
    """The documented detached run, followed twice. Ctrl-C on the first `launch logs -f`
    detaches (exit 130, no traceback, the job keeps running); an attached `launch RUN.yaml`
    follows its job through the same code (cli._follow). The second follow goes to the end,
    and cancelling the finished job says there was nothing to stop."""
    assert_ok(readme_quickstart)  # a finished run of the same spec: this one must not resume it
    submitted = shell("launch configs/examples/quickstart.yaml --detach", launch_home)
    assert_ok(submitted)
    job = re.search(r"submitted job (\S+);", submitted.stderr).group(1)
    assert f"launch logs {job} -f" in submitted.stderr

    env = {**os.environ, "LLMLAUNCH_HOME": launch_home}
    # A shell starts background commands with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: the launcher gets Ctrl-C's default disposition, as in a terminal.
    proc = subprocess.Popen([*LAUNCH, "logs", job, "-f"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if re.match(r"data(?: \(.*?\))?: ", line):  # the data is prepared; training is tens of seconds away
            break
        assert time.monotonic() < deadline, "".join(seen)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(seen) + rest
    assert proc.returncode == 130, text[-3000:]
    assert f"detached from job {job}" in text and f"launch cancel {job}" in text
    # no traceback of the launcher's own (the job's streamed log lines carry a "(pid=...)" prefix)
    assert not [line for line in text.splitlines() if line.startswith(("Traceback", "KeyboardInterrupt"))]
    status = json.loads(subprocess.run([*LAUNCH, "status", "--json"], env=env, cwd=REPO, capture_output=True,
                                       text=True, check=True).stdout)
    assert [j["status"] for j in status["jobs"] if j["job"] == job] == ["RUNNING"]

    followed = shell(f"launch logs {job} -f", launch_home)
    assert_ok(followed)
    assert re.search(r"step 30/30 +loss", followed.stdout)
    assert "resuming from" not in output(followed) and "starting at step 0/30" in output(followed)
    cancelled = shell(f"launch cancel {job}", launch_home)  # already finished: nothing to stop
    assert_ok(cancelled)
    assert "was not running" in cancelled.stderr


def test_quickstart_doc_s3_storage_keeps_credentials_out_of_the_logs(launch_home, s3_server):
    """The documented S3 run. On --cluster local the storage secret travels by a 0600 file,
    not in the runtime_env (which Ray logs and shows in its dashboard): every Ray log file
    and the output are scanned for it and for an HF token."""
    from tests.fixtures.s3 import make_bucket

    make_bucket(s3_server, "my-bucket")
    env = {**s3_server.env(), "HF_TOKEN": "hf_sentinel_value_123"}  # the documented `export` line's values
    proc = shell("launch configs/examples/quickstart.yaml checkpoint.storage=s3://my-bucket/runs", launch_home, env)
    assert_ok(proc)
    assert "run directory s3://my-bucket/runs/quickstart/" in proc.stderr
    job = re.search(r"submitted job (\S+);", proc.stderr).group(1)
    info = subprocess.run([*LAUNCH, "status", "--json"], env={**os.environ, "LLMLAUNCH_HOME": launch_home},
                          cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert job in info
    secrets = [env["AWS_SECRET_ACCESS_KEY"], "hf_sentinel_value_123"]
    texts = {"cli output": output(proc)}
    state = json.loads((Path(launch_home) / "local" / "head.json").read_text())
    for log in Path(state["temp_dir"]).glob("session_latest/logs/**/*"):
        if log.is_file():
            texts[str(log)] = log.read_text(errors="replace")
    assert len(texts) > 5  # the session's Ray logs were found and read
    leaked = [name for name, text in texts.items() for s in secrets if s in text]
    assert not leaked, leaked


def test_run_spec_page_is_current():
    from launcher.spec_doc import markdown

    assert (REPO / "docs" / "run-spec.md").read_text() == markdown(), \
        "regenerate: launch schema --markdown > docs/run-spec.md"


def test_every_shipped_config_validates(tmp_path):
    """Every YAML under configs/ (specs and cluster definitions) and every DeepSpeed JSON."""
    from launcher import preflight
    from launcher.clusters import load_cluster
    from launcher.config import load_spec
    from trainers import ds_check
    from trainers.ds_config import deepspeed_config

    yamls = sorted((REPO / "configs").rglob("*.yaml"))
    assert yamls
    for path in yamls:
        if path.parent.name == "clusters":
            load_cluster(str(path))
        else:
            preflight.check_spec(load_spec(path), str(path))
    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        spec = load_spec(REPO / "configs/examples/quickstart.yaml", [f"train.deepspeed={path}"])
        cfg = deepspeed_config(spec, use_gpu=False, total_steps=100, hidden_size=64)
        assert ds_check.check(cfg) is None, path


@pytest.mark.parametrize("command,kinds", [
    ("launch render configs/examples/prod_sft.yaml --cluster prod", ["RayCluster"]),
    ("launch render configs/examples/prod_sft.yaml --cluster prod --ephemeral", ["RayJob", "ConfigMap"]),
    ("launch render configs/examples/prod_tune.yaml --cluster prod", ["RayCluster"]),
])
def test_kubernetes_doc_render_commands(tmp_path, command, kinds):
    import yaml

    proc = shell(command, str(tmp_path))
    assert_ok(proc)
    assert [d["kind"] for d in yaml.safe_load_all(proc.stdout)] == kinds


def test_aws_doc_render_command(tmp_path):
    """docs/aws.md's `launch render`, with aws-dev.yaml copied from the example as the page tells
    a user to, and AWS pointed at a port where nothing listens: it contacts nothing."""
    import shutil
    import socket

    import yaml

    clusters = tmp_path / "clusters"
    clusters.mkdir()
    shutil.copy(REPO / "configs/clusters/aws-example.yaml", clusters / "aws-dev.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = shell("launch render configs/examples/prod_sft.yaml --cluster aws-dev", str(tmp_path),
                 env={"LLMLAUNCH_CLUSTERS": str(clusters), "AWS_ENDPOINT_URL": nowhere,
                      "AWS_EC2_METADATA_DISABLED": "true"})
    assert_ok(proc)
    [config] = yaml.safe_load_all(proc.stdout)
    assert config["cluster_name"] == "aws-dev"
    assert {t["node_config"]["InstanceType"] for t in config["available_node_types"].values()} == {
        "m6i.xlarge", "g5.12xlarge"}
