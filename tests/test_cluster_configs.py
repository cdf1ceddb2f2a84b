"""The cluster configs (cluster/) and job templates (jobs/templates/) agree with the package.

    .venv/bin/python -m pytest tests/test_cluster_configs.py -q

Parses the cluster-launcher YAML, the KubeRay manifests and the Dockerfile, and checks them
against pyproject.toml (Ray version, extras, console script), against each other (image,
volumes, token secret, RayJob = RayCluster spec) and against the templates (mount paths,
GPU worker counts, CPUs per worker). Templates must validate without their data and fail
with a message naming ``data.root`` when run without it. No network, no Ray runtime.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from distcl import cli
from distcl.config import load_job
from distcl.models.backbones import BACKBONES
from distcl.submit import check_cluster_paths

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
TEMPLATES = sorted((ROOT / "jobs" / "templates").glob("*.yaml"))
IMAGE_ROOT = "/home/ray/distcl"  # where cluster/Dockerfile puts the repository
SHARED, DATA = "/mnt/shared", "/mnt/data"


def _load(rel: str):
    return yaml.safe_load((CLUSTER / rel).read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def launcher() -> dict:
    return _load("ray-cluster.yaml")


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _load("kuberay/raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load("kuberay/rayjob.yaml")


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def _requirement(pyproject: dict, name: str) -> Requirement:
    reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


def _pods(raycluster_spec: dict) -> list[dict]:
    """Pod specs of the head and every worker group."""
    groups = [raycluster_spec["headGroupSpec"], *raycluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _install_commands(launcher: dict, dockerfile: str) -> list[str]:
    run = re.search(r"^RUN (.+?)(?:\n\n|\Z)", dockerfile, re.S | re.M).group(1)
    return [*launcher["setup_commands"], run.replace("\\\n", " ")]


# ------------------------------------------------------------------------ Ray, Python, extras
def test_ray_version_is_one_everywhere_and_fits_the_package(
    pyproject, launcher, raycluster, rayjob, dockerfile
):
    versions = {
        "launcher image": re.fullmatch(
            r"rayproject/ray:([\d.]+)-py\d+-gpu", launcher["docker"]["image"]
        ).group(1),
        "Dockerfile": re.search(
            r"^FROM rayproject/ray:([\d.]+)-py\d+-gpu$", dockerfile, re.M
        ).group(1),
        "RayCluster": raycluster["spec"]["rayVersion"],
        "RayJob": rayjob["spec"]["rayClusterSpec"]["rayVersion"],
    }
    for pod in _pods(raycluster["spec"]):
        tag = pod["containers"][0]["image"].rsplit(":", 1)[1]
        versions[f"image {tag}"] = re.search(r"ray([\d.]+)", tag).group(1)
    assert len(set(versions.values())) == 1, versions
    version = next(iter(versions.values()))
    ray_req = _requirement(pyproject, "ray")
    assert Version(version) in ray_req.specifier, (version, str(ray_req))
    assert {"default", "train", "tune"} <= ray_req.extras  # Jobs need the dashboard
    # The end-to-end test runs against this Ray: the cluster must run the same one.
    assert version == ray.__version__


def test_python_of_the_images_fits_requires_python(pyproject, launcher, dockerfile):
    spec = pyproject["project"]["requires-python"]
    for image in (
        launcher["docker"]["image"],
        re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1),
    ):
        py = re.search(r"-py(\d)(\d+)-", image)
        assert Version(f"{py.group(1)}.{py.group(2)}") in Requirement(f"x{spec}").specifier


def test_install_commands_use_existing_extras_and_keep_one_faiss(pyproject, launcher, dockerfile):
    extras = set(pyproject["project"]["optional-dependencies"])
    core = {Requirement(r).name for r in pyproject["project"]["dependencies"]}
    for cmd in _install_commands(launcher, dockerfile):
        used = re.findall(
            r"pip install [^&]*?distcl[^\[\s\"]*\[([\w,]+)\]|pip install [^&]*?"
            r"\"\.\[([\w,]+)\]\"",
            cmd,
        )
        names = {e for pair in used for group in pair if group for e in group.split(",")}
        assert names == {"gpu"}, cmd
        assert names <= extras
    # faiss-cpu and faiss-gpu share the `faiss` module: neither is a core dependency and
    # the gpu extra must not pull faiss-cpu, so a GPU image holds the GPU build alone.
    assert not any(n.startswith("faiss") for n in core)
    gpu = {Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["gpu"]}
    assert "faiss-cpu" not in gpu and any(n.startswith("faiss-gpu") for n in gpu)


# ------------------------------------------------------------------------ KubeRay
def test_rayjob_cluster_is_the_raycluster(raycluster, rayjob):
    assert raycluster["apiVersion"] == rayjob["apiVersion"] == "ray.io/v1"
    assert (raycluster["kind"], rayjob["kind"]) == ("RayCluster", "RayJob")
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


def test_rayjob_entrypoint_is_a_valid_distcl_command(pyproject, rayjob, dockerfile):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] in pyproject["project"]["scripts"]  # the console script of the image
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.no_progress
    assert args.job.startswith(IMAGE_ROOT + "/")
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, re.M)
    assert re.search(r"^COPY .* jobs \./jobs$", dockerfile, re.M)
    job = load_job(ROOT / args.job[len(IMAGE_ROOT) + 1 :])  # the file the image holds
    check_cluster_paths(job)
    assert job.output.root.startswith(SHARED)


def test_every_pod_mounts_shared_storage_data_and_shm(raycluster):
    storage = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((CLUSTER / "kuberay" / "storage.yaml").read_text())
    }
    assert "ReadWriteMany" in storage["distcl-shared"]["spec"]["accessModes"]
    for pod in _pods(raycluster["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == "distcl-shared"
        assert volumes[mounts[DATA]]["persistentVolumeClaim"]["claimName"] == "distcl-data"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in storage


def test_token_auth_on_every_container_from_one_secret(raycluster, rayjob):
    containers = [p["containers"][0] for p in _pods(raycluster["spec"])]
    containers += rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"]
    secrets = set()
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        secrets.add(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert secrets == {"distcl-ray-token"}
    images = {c["image"] for c in containers}
    assert len(images) == 1  # one image for head, workers and the submitter


def test_image_tag_names_the_package_version(pyproject, raycluster):
    image = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert f":{pyproject['project']['version']}-ray" in image


# ------------------------------------------------------------------------ cluster launcher
def test_launcher_installs_the_project_and_secures_the_head(launcher):
    assert launcher["file_mounts"][IMAGE_ROOT] == "."
    assert "~/.ray/auth_token" in launcher["file_mounts"].values()
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard`
    for cmd in (launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token ray start" in cmd
    opts = " ".join(launcher["docker"]["run_options"])
    assert f"-v {SHARED}:{SHARED}" in opts and f"-v {DATA}:{DATA}" in opts
    assert "--shm-size" in opts
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}


# ------------------------------------------------------------------------ templates
def test_there_are_the_three_templates():
    assert [p.stem for p in TEMPLATES] == ["faces", "imagenet100", "imagenet1k"]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_validates_and_fits_the_clusters(path, launcher, raycluster):
    job = load_job(path)
    smoke = load_job(path, smoke=True)
    assert smoke.scenario.max_tasks == 2 and smoke.train.epochs == 1
    check_cluster_paths(job)
    assert job.data.source == "image-folder" and job.data.root.startswith(DATA + "/")
    assert job.output.root.startswith(SHARED + "/")
    assert job.model.backbone in BACKBONES and job.train.use_gpu == "yes"
    # One Train worker per GPU: the GPU group can hold them, with the CPUs each asks for.
    gpu_group = raycluster["spec"]["workerGroupSpecs"][0]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert job.train.workers <= gpu_group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert job.train.cpus_per_worker <= float(limits["cpu"])
    gpu_nodes = launcher["available_node_types"]["gpu_worker"]
    assert job.train.workers <= gpu_nodes["max_workers"]  # g5.2xlarge: one GPU each
    assert job.train.cpus_per_worker <= 8  # g5.2xlarge vCPUs


@pytest.fixture(scope="module")
def cli_ray():
    """`distcl data build` starts an embedded Ray in this process: the templates' tests share
    it, and it ends with them (it would outlive the module otherwise)."""
    import ray

    yield
    ray.shutdown()


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_without_its_data_fails_naming_data_root(path, tmp_path, capsys, cli_ray):
    job = load_job(path)
    if Path(job.data.root).exists():
        pytest.skip(f"{job.data.root} exists on this machine")
    rc = cli.main(["data", "build", str(path), "--smoke", "--set", f"output.root={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"data.root: {job.data.root} is not a folder" in err


def test_readme_names_only_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    named = set(re.findall(r"(?:cluster|jobs)/[\w./-]+\.(?:yaml|md)|cluster/Dockerfile", text))
    assert named, "README names no files"
    missing = sorted(p for p in named if "{" not in p and not (ROOT / p).exists())
    assert not missing
