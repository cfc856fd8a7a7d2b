"""The cluster configs in infra/ stay true: Kubernetes objects validate against the Kubernetes schemas
(offline), the KubeRay fields and GPU counts agree with what the code does, every command they run is
parsed by the code's own parsers, data goes to object storage by default, and the Docker build context
and install are what the README says. Helpers: tests/unit/infra_files.py."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

from tests.unit.infra_files import (
    INFRA,
    ROOT,
    commands,
    documents,
    k8s_documents,
    launch_multi_node,
    mlflow_allows_host,
    parse_precompute,
    parse_train,
    parse_train_ray,
    pod_templates,
    pyproject,
    ray_job_entrypoint,
    worker_groups,
)

CONFIG_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"} or p.name == "Dockerfile")
JOB_SCRIPT = re.compile(r"\b(jobs/[\w/]+\.(?:py|sh))\b")
POMVID_COMMAND = re.compile(r"\bpomvid ((?:[a-z]+)(?: [a-z]+)?)")
MLFLOW_K8S = INFRA / "mlflow" / "k8s.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"

# Every file under infra/ and the tests that run or check it (test_every_infra_file_is_exercised).
EXERCISED_BY = {
    "README.md": ["test_readme_commands_parse_and_store_data_in_object_storage"],
    "docker/Dockerfile": ["test_dockerfile_copy_steps_build_the_project", "test_dockerfile_installs_the_way_the_readme_does"],
    "docker/README.md": ["test_readme_commands_parse_and_store_data_in_object_storage"],
    "ray/cluster.yaml": ["test_ray_up_config", "test_readme_commands_parse_and_store_data_in_object_storage"],
    "ray/README.md": ["test_readme_commands_parse_and_store_data_in_object_storage"],
    "k8s/raycluster.yaml": ["test_kubernetes_objects_validate_offline", "test_kuberay_fields_the_code_relies_on"],
    "k8s/rayjob-precompute.yaml": ["test_kubernetes_objects_validate_offline", "test_precompute_job_actors_fit_its_gpus"],
    "k8s/rayjob-train.yaml": ["test_kubernetes_objects_validate_offline", "test_train_job_workers_match_its_gpus"],
    "k8s/train-deepspeed.yaml": ["test_kubernetes_objects_validate_offline", "test_deepspeed_job_starts_one_launcher_per_node"],
    "k8s/README.md": ["test_readme_commands_parse_and_store_data_in_object_storage"],
    "mlflow/docker-compose.yaml": ["test_compose_mlflow_server_runs_on_postgres_and_s3", "test_local_servers_bind_to_loopback"],
    "mlflow/k8s.yaml": ["test_kubernetes_objects_validate_offline", "test_mlflow_k8s_runs_the_compose_command"],
    "mlflow/README.md": ["test_readme_commands_parse_and_store_data_in_object_storage",
                         "test_every_pomvid_command_named_answers_help"],
    "deepspeed/hostfile.example": ["test_hostfile_example_drives_the_multi_node_script"],
    "deepspeed/README.md": ["test_readme_commands_parse_and_store_data_in_object_storage"],
}
TEST_FILES = [ROOT / "tests/unit/test_infra.py", ROOT / "tests/integration/test_infra_servers.py",
              ROOT / "tests/integration/test_launch_no_ssh.py"]


def test_every_infra_file_is_exercised():
    files = {str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file()}
    assert files == set(EXERCISED_BY), f"map new infra files to their tests in EXERCISED_BY: {files ^ set(EXERCISED_BY)}"
    defined = "\n".join(path.read_text() for path in TEST_FILES)
    for name in {name for names in EXERCISED_BY.values() for name in names}:
        assert f"def {name}(" in defined, f"EXERCISED_BY names {name}, which no test defines"


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.suffix in {".yaml", ".yml"}], ids=str)
def test_yaml_parses(path):
    assert documents(path), f"{path} holds no YAML document"


# ---- Kubernetes ------------------------------------------------------------------------------------

def test_kubernetes_objects_validate_offline(monkeypatch):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    def no_network(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried to open a socket: it must validate offline")

    monkeypatch.setattr(socket, "socket", no_network)
    version, checked = latest_version(), []
    for path, doc in k8s_documents():
        # KubeRay's CRDs are not core schemas: their pod templates are, and are validated as PodTemplates.
        objects = pod_templates(doc) if doc["apiVersion"].startswith("ray.io/") else [doc]
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
            checked.append(f"{path.name}:{obj['kind']}")
    assert len(checked) >= 12, checked
    # It really validates: a misspelt field and a wrong type are refused.
    deployment = next(doc for path, doc in k8s_documents() if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for broken in ({**container, "imagePullPolicyy": "Always"}, {**container, "ports": "5000"}):
        deployment["spec"]["template"]["spec"]["containers"] = [broken]
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, version, strict=True)


def test_kuberay_fields_the_code_relies_on():
    image = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())["docker"]["image"]
    mlflow_uri, allowed = _mlflow_service_uri(), _mlflow_k8s_allowed_hosts()
    ray_floor = _lower_bound("ray")
    for path, doc in k8s_documents():
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert _version(cluster["rayVersion"]) >= ray_floor, f"{path}: rayVersion below pyproject's ray bound"
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", f"{path}: keep work off the head"
        for template in pod_templates(doc):
            for container in template["template"]["spec"]["containers"]:
                where = f"{path.name}:{container['name']}"
                assert container["image"] == image, f"{where}: another image than infra/ray/cluster.yaml's"
                env = {e["name"]: e for e in container["env"]}
                assert env["RAY_AUTH_MODE"]["value"] == "token", where
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-auth-token", "key": "token"}
                assert env["MLFLOW_TRACKING_URI"]["value"] == mlflow_uri, where
                host = mlflow_uri.split("//", 1)[1]
                assert mlflow_allows_host(allowed, host), f"{where}: MLflow would refuse Host {host}"
                for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
                    assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "pomvid-s3", f"{where}: {name}"
                mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
                assert "data" not in mounts, f"{where}: pods share no data volume; data is in object storage"
                assert all(m.get("readOnly") for n, m in mounts.items() if n == "weights"), where
        if doc["kind"] == "RayCluster":
            ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
            assert ports == {"gcs": 6379, "dashboard": 8265}
        else:  # RayJob: the job runs from the image's checkout
            assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) == {"working_dir": _dockerfile_workdir()}


def test_precompute_job_actors_fit_its_gpus():
    doc = _rayjob("rayjob-precompute.yaml")
    args = parse_precompute(ray_job_entrypoint(doc, "jobs/precompute_latents.py"))
    groups = worker_groups(doc)
    gpus = sum(g.replicas * g.gpus for g in groups)
    assert gpus == 16
    assert args.vae_concurrency == gpus, "one VAE actor per GPU the job asks for"
    vae, text = args.num_gpus_per_actor, args.text_num_gpus_per_actor
    assert 0.5 < vae <= 1, "more than half a GPU each: two VAE actors never share one"
    assert text is not None and 0 < text < 1, "the text encoder takes a fraction of a GPU, set explicitly"
    # Ray may put the text actors anywhere, all on one GPU included: whatever the order they are placed
    # in, every actor must find room (what Ray does with fractional GPUs: a request fits one GPU).
    vae_actors, text_actors = [vae] * args.vae_concurrency, [text] * args.text_concurrency
    for order in (vae_actors + text_actors, text_actors + vae_actors):
        assert _place_packed(order, [g.gpus for g in groups for _ in range(g.replicas)]), (
            f"actors {order} do not all fit on {gpus} GPUs")
    cpus = (args.vae_num_cpus * args.vae_concurrency + args.text_num_cpus * args.text_concurrency
            + args.decode_num_cpus + args.write_num_cpus)
    assert cpus <= sum(g.replicas * g.cpus for g in groups), "the stages reserve more CPUs than the workers have"
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")


def test_train_job_workers_match_its_gpus():
    doc = _rayjob("rayjob-train.yaml")
    ray_args, train_args = parse_train_ray(ray_job_entrypoint(doc, "jobs/train_ray.py"))
    groups = worker_groups(doc)
    assert ray_args.workers * ray_args.gpus_per_worker == sum(g.replicas * g.gpus for g in groups) == 16
    assert ray_args.workers * ray_args.cpus_per_worker <= sum(g.replicas * g.cpus for g in groups)
    _assert_trains_from_object_storage(train_args, "rayjob-train.yaml")


def test_deepspeed_job_starts_one_launcher_per_node(tmp_path):
    service, job = (doc for path, doc in k8s_documents() if path.name == "train-deepspeed.yaml")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = container["args"][0]
    # The pod's command, run here with `deepspeed` replaced by echo: the launcher it would start.
    launcher = launch_multi_node(["bash", "-c", script], tmp_path, extra_env={"JOB_COMPLETION_INDEX": "1"})
    options = _flags(launcher[:launcher.index("jobs/train.py")])
    nodes = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == nodes
    assert "--no_ssh" in options and options["--node_rank"] == "1"
    assert options["--num_nodes"] == str(nodes)
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    hostfile = (tmp_path / f"pomvid-hostfile-{nodes}x{gpus}").read_text().split()
    assert hostfile == [item for n in range(nodes) for item in (f"node-{n}", f"slots={gpus}")]
    port = service["spec"]["ports"][0]["port"]
    assert options["--master_port"] == str(port) == str(container["ports"][0]["containerPort"])
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert options["--master_addr"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    train_args = launcher[launcher.index("jobs/train.py") + 1:]
    _assert_trains_from_object_storage(parse_train(train_args), "train-deepspeed.yaml")


# ---- MLflow ----------------------------------------------------------------------------------------

def _mlflow_k8s_command() -> list[str]:
    deployment = next(doc for doc in documents(MLFLOW_K8S) if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    return shlex.split(container["args"][0])


def _mlflow_k8s_allowed_hosts() -> list[str]:
    command = _mlflow_k8s_command()
    return command[command.index("--allowed-hosts") + 1].split(",")


def _mlflow_service_uri() -> str:
    service = next(doc for doc in documents(MLFLOW_K8S) if doc["kind"] == "Service" and doc["metadata"]["name"] == "mlflow")
    meta = service["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}"


def _flags(command: list[str]) -> dict[str, str | None]:
    out, i = {}, 0
    while i < len(command):
        if command[i].startswith("--"):
            takes_value = i + 1 < len(command) and not command[i + 1].startswith("--")
            out[command[i]] = command[i + 1] if takes_value else None
            i += 2 if takes_value else 1
        else:
            i += 1
    return out


def test_mlflow_k8s_runs_the_compose_command():
    compose = shlex.split(yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["command"])
    k8s = _mlflow_k8s_command()
    assert compose[:2] == k8s[:2] == ["mlflow", "server"]
    compose_flags, k8s_flags = _flags(compose[2:]), _flags(k8s[2:])
    assert compose_flags.keys() == k8s_flags.keys(), "the two deployments run different flags"
    differ = {flag for flag in compose_flags if compose_flags[flag] != k8s_flags[flag]}
    assert differ <= {"--backend-store-uri", "--artifacts-destination", "--allowed-hosts"}, differ
    for flags in (compose_flags, k8s_flags):
        assert flags["--backend-store-uri"].startswith("postgresql+psycopg2://")
        assert flags["--artifacts-destination"].startswith("s3://")
    for host in ("mlflow.mlflow.svc.cluster.local:5000", "mlflow.mlflow:5000", "127.0.0.1:5000", "localhost:5000"):
        assert mlflow_allows_host(_mlflow_k8s_allowed_hosts(), host), host
    assert not mlflow_allows_host(_mlflow_k8s_allowed_hosts(), "attacker.example:5000")
    # The image has the driver the URI names and boto3 for s3:// (the `server` extra).
    server = " ".join(pyproject()["project"]["optional-dependencies"]["server"])
    assert "psycopg2" in server and "boto3" in server


def test_local_servers_bind_to_loopback():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"compose service {name} publishes {port} beyond 127.0.0.1"
    services = [(path, doc) for path, doc in k8s_documents() if doc["kind"] == "Service"]
    assert len(services) == 3
    for path, doc in services:
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path}: a Service reachable beyond the cluster"
    for path, doc in k8s_documents():
        assert "LoadBalancer" not in yaml.safe_dump(doc) and doc["kind"] != "Ingress", path


# ---- ray up, READMEs, launch scripts ---------------------------------------------------------------

def test_ray_up_config():
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert config["file_mounts"] == {"/root/.ray/auth_token": "~/.ray/auth_token"}
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    gpus_per_instance = {"p5.48xlarge": 8, "p4d.24xlarge": 8, "p5e.48xlarge": 8}
    for name, node in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        # Workers reach the bucket through an instance profile (they get no role by default).
        assert "Arn" in node["node_config"]["IamInstanceProfile"], name
        if "GPU" in node["resources"]:
            assert node["resources"]["GPU"] == gpus_per_instance[node["node_config"]["InstanceType"]], name


def test_readme_commands_parse_and_store_data_in_object_storage(tmp_path):
    seen = set()
    for path, line in commands():
        words = shlex.split(line.split("  #")[0])
        where = str(path.relative_to(ROOT))
        for word in words:
            if word.startswith("infra/") and "*" not in word:
                assert (ROOT / word).exists(), f"{where}: names {word}, which does not exist"
                seen.add((where, "infra path"))
        if words[:3] == ["pomvid", "submit", "precompute"]:
            args = parse_precompute(words[words.index("--") + 1:])
            assert args.manifest.startswith("s3://") and args.output.startswith("s3://"), f"{path}: {line}"
            seen.add((where, "precompute"))
        elif words[:3] == ["pomvid", "submit", "train"]:
            _, train_args = parse_train_ray(words[words.index("--") + 1:])
            _assert_trains_from_object_storage(train_args, f"{path}: {line}")
            seen.add((where, "train"))
        elif words and words[0] == "jobs/launch/multi_node.sh":
            launcher = launch_multi_node(["bash", *words], tmp_path)
            assert "jobs/train.py" in launcher, launcher
            parse_train(launcher[launcher.index("jobs/train.py") + 1:])
            seen.add((where, "multi_node"))
    for expected in [("README.md", "precompute"), ("README.md", "train"), ("README.md", "multi_node"),
                     ("infra/ray/cluster.yaml", "precompute"), ("infra/ray/cluster.yaml", "train"),
                     ("infra/ray/README.md", "train"), ("infra/k8s/README.md", "precompute"),
                     ("infra/deepspeed/README.md", "multi_node"),
                     *[(str(p.relative_to(ROOT)), "infra path") for p in INFRA.glob("*/README.md")]]:
        assert expected in seen, f"no {expected[1]} command found in {expected[0]}: {seen}"
    # infra/README.md's table lists exactly the folders there are.
    listed = re.findall(r"^\| `(\w+)/` \|", (INFRA / "README.md").read_text(), re.M)
    assert sorted(listed) == sorted(p.name for p in INFRA.iterdir() if p.is_dir()), listed


def test_hostfile_example_drives_the_multi_node_script(tmp_path):
    hostfile = INFRA / "deepspeed" / "hostfile.example"
    entries = [line.split() for line in hostfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert entries and all(len(e) == 2 and re.fullmatch(r"slots=\d+", e[1]) for e in entries), entries
    launcher = launch_multi_node(["bash", "jobs/launch/multi_node.sh", "--hostfile", str(hostfile), "--nodes",
                                  str(len(entries)), "--recipe", "XL"], tmp_path)
    assert launcher[:2] == ["--hostfile", str(hostfile)] and launcher[-3:] == ["jobs/train.py", "--recipe", "XL"]
    assert "--no_ssh" not in launcher and launcher[launcher.index("--num_nodes") + 1] == str(len(entries))
    # Bad input is refused before any launcher starts, naming what to fix.
    bad = subprocess.run(["bash", "jobs/launch/multi_node.sh", "--no-ssh", "--num-nodes", "2", "--node-rank", "2",
                          "--master-addr", "h"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin", "DEEPSPEED": "false"})
    assert bad.returncode == 2 and "--node-rank 2 must be a whole number from 0 to 1" in bad.stderr


def test_every_job_script_named_exists_and_answers_help():
    scripts = {s for path, line in commands(top_readme=False, include_yaml_args=True) for s in JOB_SCRIPT.findall(line)}
    assert {"jobs/precompute_latents.py", "jobs/train_ray.py", "jobs/launch/multi_node.sh"} <= scripts
    for script in sorted(scripts):
        path = ROOT / script
        assert path.is_file(), f"infra names {script}, which does not exist"
        runner = [sys.executable] if script.endswith(".py") else ["bash"]
        result = subprocess.run([*runner, str(path), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, f"{script} --help failed: {result.stderr[-2000:]}"
        assert "usage" in result.stdout.lower(), f"{script} --help printed no usage: {result.stdout[:500]}"


def test_every_pomvid_command_named_answers_help(capsys):
    from pipeline.cli import main

    named = {c for path, line in commands(include_yaml_args=True) for c in POMVID_COMMAND.findall(line)}
    assert {"submit precompute", "submit train", "runs compare"} <= named, named
    for command in sorted(named):
        with pytest.raises(SystemExit) as done:  # argparse exits after printing the help
            main([*command.split(), "--help"])
        assert done.value.code == 0, f"`pomvid {command} --help` failed: {capsys.readouterr().err[-2000:]}"
        assert "usage" in capsys.readouterr().out.lower(), f"`pomvid {command} --help` printed no usage"


# ---- Docker ----------------------------------------------------------------------------------------

def test_dockerfile_installs_the_way_the_readme_does():
    readme = (ROOT / "README.md").read_text()
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    install_steps = [line.split("RUN", 1)[1].strip() for line in dockerfile.splitlines() if line.startswith("RUN bash run.sh")]
    assert install_steps == ["bash run.sh setup", "bash run.sh setup"], install_steps
    assert re.search(r"^\s+bash run\.sh setup\b", readme, re.M), "the README must document `bash run.sh setup`"
    # run.sh installs the dev extra, which pulls the server extra (psycopg2, boto3) into the image.
    assert 'pip install -q -e ".[dev]"' in (ROOT / "run.sh").read_text()
    extras = pyproject()["project"]["optional-dependencies"]
    assert "pomvid[server]" in extras["dev"]


def _dockerfile_workdir() -> str:
    (workdir,) = [line.split()[1] for line in (INFRA / "docker" / "Dockerfile").read_text().splitlines()
                  if line.startswith("WORKDIR")]
    return workdir


def test_dockerfile_copy_steps_build_the_project(tmp_path):
    from tests.unit.infra_files import build_context, dockerfile_steps, replay_copy

    context = build_context(ROOT)
    junk = [f for f in context if f.split("/")[0] in {".venv", "venv", ".git", "outputs", "runs"} or
            "__pycache__" in f or f.endswith((".pyc", ".mp4", ".pt", ".db"))]
    assert not junk, f".dockerignore lets these into the image: {junk[:10]}"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = [f for f in tracked if (ROOT / f).is_file() and f not in context]
    assert not missing, f".dockerignore leaves out files of the repository: {missing[:10]}"
    image = tmp_path / "image"
    for op, args in dockerfile_steps():
        if op == "COPY":
            replay_copy(args, context, image / _dockerfile_workdir().lstrip("/"))
        elif op == "RUN" and args == "bash run.sh setup":
            workdir = image / _dockerfile_workdir().lstrip("/")
            # Each install starts from the image's own environment: nothing of the host's venv or stamp.
            assert not (workdir / ".venv").exists() and not list(workdir.glob(".venv/.pomvid-installed-*"))
            first = not (workdir / "pipeline" / "cli.py").exists()
            if first:  # the dependency layer: its files alone must be enough for pip to build pomvid
                result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                         "--wheel-dir", str(tmp_path / "wheels"), str(workdir)],
                                        capture_output=True, text=True, timeout=300)
                assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
                assert [w.name.split("-")[0] for w in (tmp_path / "wheels").iterdir()] == ["pomvid"]
    assert (image / "opt/pomvid/pipeline/cli.py").is_file() and (image / "opt/pomvid/run.sh").is_file()


# ---- helpers -----------------------------------------------------------------------------------------

def _rayjob(name: str) -> dict:
    (doc,) = documents(INFRA / "k8s" / name)
    return doc


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _lower_bound(package: str) -> tuple[int, ...]:
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.match(rf"{package}(\[[^\]]*\])?>=([\d.]+)", requirement)
        if match:
            return _version(match.group(2))
    raise AssertionError(f"pyproject.toml has no lower bound for {package}")


def _place_packed(requests: list[float], gpus_per_node: list[int]) -> bool:
    """Place fractional-GPU requests (each on one GPU) in order, each on the fullest GPU it still fits:
    the worst packing for what comes after. True when every request found a GPU."""
    free = [10_000] * sum(gpus_per_node)  # in 1/10000 GPU, as Ray counts fractions
    for request in requests:
        need = round(request * 10_000)
        fitting = [i for i, room in enumerate(free) if room >= need]
        if not fitting:
            return False
        best = min(fitting, key=lambda i: free[i])
        free[best] -= need
    return True


def _assert_trains_from_object_storage(args, where: str) -> None:
    assert args.data.startswith("s3://"), f"{where}: latents should come from object storage"
    mirrors = [o.split("=", 1)[1] for o in args.overrides if o.startswith("train.checkpoint_mirror=")]
    assert mirrors and mirrors[0].startswith("s3://"), f"{where}: no train.checkpoint_mirror=s3://..."
    assert args.resume == "auto", where
    from pipeline.train.entry import config_from_args

    # The field the manifests set exists and takes the value (an unknown field is a ConfigError).
    assert config_from_args(args).train.checkpoint_mirror == mirrors[0], where
