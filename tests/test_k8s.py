"""Offline checks of the Kubernetes manifests, the image and the `ray up` config.

Every kustomization under k8s/ (base, overlays, optional components) must build with `kubectl kustomize`
on its own; the overlays' builds are then checked: core kinds are validated against the Kubernetes
schemas (kubernetes-validate, strict), KubeRay kinds against the KubeRay v1.7.0 CRDs turned into
JSON Schema that rejects unknown fields; then come the rules a reviewer would check by hand.
CEL rules (x-kubernetes-validations) are the API server's to enforce and are not checked here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inpaint import recipes
from inpaint.config import apply_overrides

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("celeba", "lfw", "debug")
GPU_OVERLAYS = {"celeba": True, "lfw": True, "debug": False}
RAYCRONJOB_COMPONENT = K8S / "optional" / "raycronjob"
# KubeRay v1.7.0; a user's clone has no ../shared (KUBERAY_CRDS names another folder, e.g. from a worktree)
CRD_DIR = Path(os.environ.get("KUBERAY_CRDS") or REPO.parent / "shared" / "k8s" / "crds")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
SERVE_COMPONENT = K8S / "optional" / "serve"
KUBERNETES_VERSION = "1.30.0"  # the oldest the test dependency kubernetes-validate>=1.30 ships
KUBECTL = shutil.which("kubectl")
SECRET_LIKE = re.compile(r"SECRET|KEY|PASSWORD|TOKEN", re.IGNORECASE)
IMAGE_TAG = re.compile(r"^(?P<project>\d+\.\d+\.\d+)-ray(?P<ray>\d+\.\d+\.\d+)(?:-(?P<platform>[a-z0-9]+))?$")
ENV_REFERENCE = re.compile(r"\$\{(\w+)(?::\?)?\}|\$\((\w+)\)")  # shell ${VAR} / ${VAR:?} and Kubernetes $(VAR)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------
# Building and walking the manifests


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize PATH` prints."""
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed: {result.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict[str, Any]]]:
    """Every overlay, built once for the module."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def overlay_with_component(root: Path, component_dir: Path) -> list[dict[str, Any]]:
    """The celeba overlay with an optional component, as a user would add it."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    # kustomize refuses absolute paths to other kustomizations.
    overlay = os.path.relpath(K8S / "overlays" / "celeba", root)
    component = os.path.relpath(component_dir, root)
    (root / "kustomization.yaml").write_text(
        f"namespace: inpaint-celeba\nresources: [{overlay}]\ncomponents: [{component}]\n")
    return kustomize(root)


@pytest.fixture(scope="module")
def raycronjob_build(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The celeba overlay with the optional RayCronJob component."""
    return overlay_with_component(tmp_path_factory.mktemp("raycronjob"), RAYCRONJOB_COMPONENT)


@pytest.fixture(scope="module")
def serve_build(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The celeba overlay with the optional serving component (a RayService)."""
    return overlay_with_component(tmp_path_factory.mktemp("serve"), SERVE_COMPONENT)


KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")  # the names kustomize reads


def kustomization_dirs() -> list[Path]:
    """Every directory under k8s/ holding a kustomization, found by walking the tree (optional ones too)."""
    return sorted({path.parent for name in KUSTOMIZATION_FILES for path in K8S.rglob(name)})


def test_the_walk_finds_the_base_the_overlays_and_the_optional_components():
    found = {directory.relative_to(K8S).as_posix() for directory in kustomization_dirs()}
    assert {"base", "optional/raycronjob", *(f"overlays/{name}" for name in OVERLAYS)} <= found


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda path: path.relative_to(K8S).as_posix())
def test_every_kustomization_builds_on_its_own(directory):
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    assert kustomize(directory), f"kubectl kustomize {directory} printed no resources"


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The documents of one kind."""
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single document of a kind."""
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_specs(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec (a mapping with a containers list) anywhere in a document."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from pod_specs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from pod_specs(value, f"{where}[{index}]")


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container and init container of every pod spec, named for messages."""
    for doc in docs:
        for where, spec in pod_specs(doc):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                yield f"{doc['kind']}/{doc['metadata']['name']}{where}:{container['name']}", container


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayClusterSpecs a KubeRay resource holds (none for a RayJob that selects a cluster)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if doc["kind"] == "RayCronJob":
        return ray_cluster_specs({"kind": "RayJob", "spec": spec["jobTemplate"]})
    if doc["kind"] == "RayService":
        return [spec["rayClusterConfig"]]
    return []


def ray_pod_specs(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod spec) for the head and each worker group of a RayClusterSpec."""
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def gpus(container: dict[str, Any], field: str = "limits") -> int:
    """The NVIDIA GPUs a container asks for in its limits (or requests)."""
    return int(container.get("resources", {}).get(field, {}).get("nvidia.com/gpu", 0))


def cpu_cores(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("500m", "8") in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "48Gi") in bytes."""
    for suffix, factor in {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}.items():
        if quantity.endswith(suffix):
            return int(float(quantity[:-2]) * factor)
    return int(quantity)


# ---------------------------------------------------------------------------------------------
# Entry points, parsed by the jobs' own argument parsers


@cache
def job_parser(script: str):
    """`build_parser()` of a job script in this repo, loaded from its file."""
    path = REPO / script
    assert path.is_file(), f"the manifests run {script}, which does not exist in this repo"
    spec = importlib.util.spec_from_file_location(f"_k8s_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def parse_python_command(argv: list[str], where: str):
    """Parse `python jobs/x.py ARGS` with the script's real parser: (script, namespace)."""
    assert argv[:1] == ["python"] and len(argv) >= 2, f"{where}: expected `python jobs/...`, got {argv}"
    script, rest = argv[1], argv[2:]
    try:
        return script, job_parser(script).parse_args(rest)
    except SystemExit:
        pytest.fail(f"{where}: {script} rejects the arguments {rest}")


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The plain environment a container gets from its ConfigMaps and literal env values."""
    config_maps = {cm["metadata"]["name"]: cm.get("data", {}) for cm in of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in config_maps, f"envFrom names ConfigMap {name}, which is not in the build"
            env.update(config_maps[name])
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return env


def expand(text: str, env: dict[str, str], where: str) -> str:
    """Substitute ${VAR} and $(VAR) as the shell or the kubelet would, failing on unknown names."""
    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in env, f"{where}: {name} is used but the container's environment does not define it"
        return env[name]
    return ENV_REFERENCE.sub(substitute, text)


def training(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    """The training RayJob and its parsed, expanded entrypoint."""
    job = one(docs, "RayJob")
    assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
    # In K8sJobMode the submitter's shell expands the entrypoint, with the submitter's environment.
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    entrypoint = expand(job["spec"]["entrypoint"], container_env(submitter, docs), "RayJob entrypoint")
    script, args = parse_python_command(shlex.split(entrypoint), "RayJob entrypoint")
    assert script == "jobs/train.py"
    return job, args


def submitted_command(container: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A `ray job submit ... -- ENTRYPOINT` container command: (submit options, entrypoint)."""
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:3] == ["ray", "job", "submit"] and "--" in argv, f"not a `ray job submit ... --` command: {argv}"
    split = argv.index("--")
    return argv[3:split], argv[split + 1:]


def option(argv: list[str], name: str) -> str | None:
    """The value following a flag in an argv, or None."""
    return argv[argv.index(name) + 1] if name in argv else None


# ---------------------------------------------------------------------------------------------
# KubeRay CRDs as JSON Schema


def crd_to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI v3 schema as JSON Schema in which unknown fields are errors."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: crd_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [crd_to_json_schema(sub) for sub in value]
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = crd_to_json_schema(value)
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-embedded-resource"):
        properties = out.setdefault("properties", {})
        properties.setdefault("apiVersion", {"type": "string"})
        properties.setdefault("kind", {"type": "string"})
        properties.setdefault("metadata", {"type": "object"})
    if "required" in out:
        # The API server fills in defaulted fields, so a manifest may leave them out.
        defaulted = {name for name, sub in schema.get("properties", {}).items() if "default" in sub}
        out["required"] = [name for name in out["required"] if name not in defaulted]
        if not out["required"]:
            del out["required"]
    if "properties" in out and "additionalProperties" not in out \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(kind, apiVersion) -> a validator built from the KubeRay CRD."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}")
    validators = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / filename).read_text(), Loader=SAFE_LOADER)
        for version in crd["spec"]["versions"]:
            schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"])
            api_version = f"{crd['spec']['group']}/{version['name']}"
            validators[kind, api_version] = jsonschema.Draft7Validator(schema)
    return validators


def kuberay_errors(validators, doc: dict[str, Any]) -> list[str]:
    """Every schema violation of a KubeRay resource, as path: message."""
    key = (doc["kind"], doc["apiVersion"])
    assert key in validators, f"no KubeRay CRD for {key}"
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validators[key].iter_errors(doc)]


# ---------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_the_whole_system_in_its_namespace(builds, overlay):
    docs = builds[overlay]
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "ConfigMap", "RayCluster", "RayJob", "CronJob", "ServiceAccount",
            "Deployment", "Service", "NetworkPolicy"} <= kinds
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert namespace == f"inpaint-{overlay}"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']} outside {namespace}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_match_kubernetes_schemas(builds, overlay):
    core = [doc for doc in builds[overlay] if not doc["apiVersion"].startswith("ray.io/")]
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {error}")


def test_strict_kubernetes_validation_rejects_a_misspelled_field(builds):
    cron = copy.deepcopy(one(builds["celeba"], "CronJob"))
    cron["spec"]["concurrencyPolicyy"] = cron["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_kinds_match_kuberay_crds(builds, kuberay_validators, overlay):
    for doc in builds[overlay]:
        if doc["apiVersion"].startswith("ray.io/"):
            assert kuberay_errors(kuberay_validators, doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("path, misspelled", [
    (["spec", "workerGroupSpecs", 0], "minReplicas"),
    (["spec", "headGroupSpec", "template", "spec", "containers", 0], "volumeMounts"),
    (["spec"], "rayVersion"),
])
def test_crd_validator_rejects_a_misspelled_field(builds, kuberay_validators, path, misspelled):
    cluster = copy.deepcopy(one(builds["celeba"], "RayCluster"))
    node = cluster
    for step in path:
        node = node[step]
    node[misspelled + "s"] = node.pop(misspelled)
    errors = kuberay_errors(kuberay_validators, cluster)
    assert any(misspelled + "s" in error for error in errors), errors


def test_crd_conversion_keeps_maps_int_or_string_and_preserved_objects_open():
    schema = crd_to_json_schema({
        "type": "object",
        "required": ["name", "mode"],
        "properties": {
            "name": {"type": "string"},
            "mode": {"type": "string", "default": "auto"},
            "port": {"x-kubernetes-int-or-string": True},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "config": {"type": "object", "properties": {"a": {"type": "integer"}},
                       "x-kubernetes-preserve-unknown-fields": True},
        },
    })
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"name": "x", "port": "http", "labels": {"any": "thing"}, "config": {"b": 1}})
    assert validator.is_valid({"name": "x", "port": 8265})
    assert not validator.is_valid({"name": "x", "port": 1.5})
    assert not validator.is_valid({"name": "x", "nmae": "y"})
    assert not validator.is_valid({"mode": "auto"})  # name has no default: still required


# ---------------------------------------------------------------------------------------------
# Reviewer rules: GPUs, shared memory, images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_are_limits_of_worker_groups_and_never_of_the_head(builds, overlay):
    clusters = [c for doc in builds[overlay] for c in ray_cluster_specs(doc)]
    assert len(clusters) == 2  # the long-lived cluster and the training cluster
    for cluster in clusters:
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        assert all(gpus(c) == 0 and gpus(c, "requests") == 0 for c in head), "the head must not take a GPU"
        for group in cluster["workerGroupSpecs"]:
            ray_container = group["template"]["spec"]["containers"][0]
            if GPU_OVERLAYS[overlay]:
                assert gpus(ray_container) >= 1, f"worker group {group['groupName']} has no nvidia.com/gpu limit"
                assert gpus(ray_container, "requests") in (0, gpus(ray_container)), "GPU requests must equal limits"
                assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
            else:
                assert gpus(ray_container) == 0 and gpus(ray_container, "requests") == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_containers_mount_a_memory_backed_dev_shm(builds, overlay):
    for doc in builds[overlay]:
        for cluster in ray_cluster_specs(doc):
            for group, spec in ray_pod_specs(cluster):
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                ray_container = spec["containers"][0]
                mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
                assert "/dev/shm" in mounts, f"{doc['kind']} {group}: no /dev/shm mount"
                empty_dir = volumes[mounts["/dev/shm"]].get("emptyDir", {})
                assert empty_dir.get("medium") == "Memory", f"{doc['kind']} {group}: /dev/shm is not tmpfs"
                memory = ray_container["resources"]["limits"]["memory"]
                assert memory_bytes(empty_dir["sizeLimit"]) < memory_bytes(memory), \
                    "/dev/shm counts against the container's memory limit"


@pytest.mark.parametrize("overlay", [name for name, gpu in GPU_OVERLAYS.items() if gpu])
def test_gpu_training_runs_one_pod_per_node_with_all_its_gpus_cores_for_loaders_and_nccl_settings(builds, overlay):
    job, args = training(builds[overlay])
    config = apply_overrides(recipes.get(args.recipe), args.overrides)
    workers = max(int(n) for n in args.workers.split("-"))
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        ray_container = spec["containers"][0]
        per_pod = gpus(ray_container)
        # Several training workers per pod: NCCL between them goes over NVLink / shared memory, not TCP.
        assert per_pod >= 2 and workers == group["replicas"] * per_pod, \
            f"{group['groupName']}: {per_pod} GPU(s) per pod for {workers} workers: give each pod a node's GPUs"
        # Each worker's training process and its DataLoader processes get a core each, and all fit the pod.
        assert args.cpus_per_worker >= 1 + config.data.num_workers, \
            f"--cpus-per-worker {args.cpus_per_worker} leaves the {config.data.num_workers} loader workers no cores"
        assert per_pod * args.cpus_per_worker <= cpu_cores(ray_container["resources"]["limits"]["cpu"])
        # /dev/shm holds Ray's object store, NCCL's shared-memory transport and the loaders' buffers.
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
        shm = memory_bytes(volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"])
        assert shm >= per_pod * 2**30, "/dev/shm: at least 1 GiB per GPU"
        store = group.get("rayStartParams", {}).get("object-store-memory")
        assert store is None or int(store) <= shm // 2, "Ray's object store would crowd /dev/shm"
        env = {item["name"]: item.get("value") for item in ray_container.get("env", [])}
        assert env.get("NCCL_DEBUG") == "WARN" and env.get("NCCL_SOCKET_IFNAME"), "NCCL settings (k8s/README.md)"


def dockerfile() -> str:
    """The text of k8s/Dockerfile."""
    return (K8S / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    """The default of an ARG in k8s/Dockerfile."""
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile(), re.MULTILINE)
    assert match, f"k8s/Dockerfile has no ARG {name}=..."
    return match.group(1)


def project_metadata() -> dict[str, Any]:
    """The [project] table of pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pinned_ray_version() -> str:
    """The exact Ray version pyproject.toml pins."""
    pins = [dep for dep in project_metadata()["dependencies"] if re.match(r"ray\b", dep)]
    assert len(pins) == 1 and "==" in pins[0], f"pyproject.toml must pin ray exactly, got {pins}"
    return pins[0].split("==")[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_tag_matches_ray_version(builds, overlay):
    docs = builds[overlay]
    ray_versions = {cluster["rayVersion"] for doc in docs for cluster in ray_cluster_specs(doc)}
    assert ray_versions == {dockerfile_arg("RAY_VERSION")} == {pinned_ray_version()}
    images = {container["image"] for _, container in containers(docs)}
    assert len(images) == 1, f"every pod should run the one project image, got {images}"
    repository, tag = images.pop().rsplit(":", 1)
    match = IMAGE_TAG.match(tag)
    assert match, f"tag {tag} does not read <project version>-ray<Ray version>[-platform]"
    assert match["ray"] in ray_versions
    assert match["project"] == project_metadata()["version"]
    if GPU_OVERLAYS[overlay]:
        assert match["platform"] != "cpu", "GPU pods need the CUDA build of the image"


def test_dockerfile_builds_on_the_matching_ray_image_with_pinned_cuda_torch():
    text = dockerfile()
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${PLATFORM}" in text
    assert dockerfile_arg("PLATFORM").startswith("cu"), "the default build is the GPU one"
    import torch

    if torch.version.cuda:  # a CUDA build of torch runs the tests: the image must install that very build
        tested = "cu" + torch.version.cuda.replace(".", "")
        assert dockerfile_arg("PLATFORM") == tested, \
            f"the image installs torch for {dockerfile_arg('PLATFORM')}, the tests run its {tested} build"
    assert "--index-url https://download.pytorch.org/whl/${PLATFORM}" in text
    for package in ("torch", "torchvision"):
        match = re.search(rf"\b{package}==(\S+)", text)
        assert match, f"k8s/Dockerfile does not pin {package}"
        tested = metadata.version(package).split("+")[0]
        assert match.group(1) == tested, f"image pins {package}=={match.group(1)}, tests run {tested}"
    assert re.search(r"^RUN pip install .*\s\.(\s|$)", text, re.MULTILINE), "the image must `pip install .`"
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user and user[-1] not in ("0", "root"), "the image must end as a non-root user"


# ---------------------------------------------------------------------------------------------
# Reviewer rules: entry points, run names, evaluation, TensorBoard


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_entrypoint_is_accepted_by_train_py(builds, overlay):
    job, args = training(builds[overlay])
    config = apply_overrides(recipes.get(args.recipe), args.overrides)  # raises on a bad --set
    assert config.recipe == args.recipe
    assert args.data and args.data.startswith("s3://") and args.storage.startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["backoffLimit"] >= 1, "a failed attempt should be retried (it resumes)"
    assert "clusterSelector" not in job["spec"], "shutdownAfterJobFinishes needs the RayJob's own cluster"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_cluster_fits_the_requested_workers_exactly(builds, overlay):
    job, args = training(builds[overlay])
    cluster = job["spec"]["rayClusterSpec"]
    assert not cluster.get("enableInTreeAutoscaling"), "the training cluster has a fixed size"
    wanted = [int(n) for n in args.workers.split("-")]
    slots = 0
    for group in cluster["workerGroupSpecs"]:
        ray_container = group["template"]["spec"]["containers"][0]
        per_pod = gpus(ray_container) if args.gpu else \
            int(cpu_cores(ray_container["resources"]["limits"]["cpu"]) // args.cpus_per_worker)
        slots += group["replicas"] * per_pod
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    assert args.gpu == GPU_OVERLAYS[overlay], "--gpu must match whether the workers have GPUs"
    assert max(wanted) == slots, f"--workers {args.workers} but the cluster holds {slots}: scale both together"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_run_name_is_fixed(builds, overlay):
    for doc in builds[overlay]:
        assert "generateName" not in doc["metadata"], f"{doc['kind']} uses generateName"
    job = one(builds[overlay], "RayJob")
    _, args = training(builds[overlay])
    # Only a literal name survives a re-created RayJob: no variables, command substitution or dates.
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name), f"run name {args.name!r} is not a literal"
    assert "$(" not in job["spec"]["entrypoint"] and "`" not in job["spec"]["entrypoint"]
    assert "--name" in shlex.split(job["spec"]["entrypoint"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cronjob_submits_evaluation_of_the_training_run(builds, overlay):
    docs = builds[overlay]
    _, train = training(docs)
    run_url = f"{train.storage.rstrip('/')}/{train.name}"
    cron = one(docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    options, entrypoint = submitted_command(container)
    env = container_env(container, docs)
    script, args = parse_python_command([expand(a, env, "CronJob args") for a in entrypoint], "CronJob")
    assert script == "jobs/evaluate.py"
    assert args.watch == run_url, "the CronJob must evaluate the run the RayJob trains"
    assert args.data == train.data
    # The address is the long-lived cluster's head Service, on its dashboard port.
    cluster = one(docs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    assert option(options, "--address") == f"http://{cluster['metadata']['name']}-head-svc:{dashboard}"
    # The head takes no work (num-cpus 0), so the entrypoint must ask for what a worker offers.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    wanted = "--entrypoint-num-gpus" if GPU_OVERLAYS[overlay] else "--entrypoint-num-cpus"
    assert float(option(options, wanted)) >= 1, f"the CronJob should submit with {wanted}"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_evaluator_gets_no_kubernetes_api_access(builds, overlay):
    docs = builds[overlay]
    pod = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(docs, "ServiceAccount")}
    account = pod["serviceAccountName"]
    assert account in accounts, f"the CronJob's ServiceAccount {account} is not in the build"
    # `ray job submit` only talks to the Ray dashboard: no token, and no binding grants it anything.
    assert pod["automountServiceAccountToken"] is False
    assert accounts[account]["automountServiceAccountToken"] is False
    for binding in of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding"):
        assert account not in {s["name"] for s in binding.get("subjects", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tensorboard_reads_the_training_runs_logs(builds, overlay):
    docs = builds[overlay]
    _, train = training(docs)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"] + [expand(a, container_env(container, docs), "TensorBoard") for a in container["args"]]
    assert argv[0] == "tensorboard"
    assert option(argv, "--logdir") == f"{train.storage.rstrip('/')}/{train.name}/tensorboard"
    env = container_env(container, docs)
    # TensorBoard's boto3 reader takes S3_ENDPOINT; the project's own code takes AWS_ENDPOINT_URL.
    assert env["S3_ENDPOINT"] == env["AWS_ENDPOINT_URL"]
    assert env["S3_USE_HTTPS"] == ("1" if env["S3_ENDPOINT"].startswith("https://") else "0")


# ---------------------------------------------------------------------------------------------
# Reviewer rules: security


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_plaintext_secrets(builds, overlay):
    docs = builds[overlay]
    assert of_kind(docs, "Secret") == [], "Secrets are created with kubectl, never built"
    for where, container in containers(docs):
        for var in container.get("env", []):
            if SECRET_LIKE.search(var["name"]):
                assert "value" not in var, f"{where}: {var['name']} has a literal value"
                assert "secretKeyRef" in var.get("valueFrom", {}), f"{where}: {var['name']} not from a Secret"
        for source in container.get("envFrom", []):
            assert set(source) <= {"configMapRef", "secretRef", "prefix"}
    for config_map in of_kind(docs, "ConfigMap"):
        leaked = [key for key in config_map.get("data", {}) if SECRET_LIKE.search(key)]
        assert not leaked, f"ConfigMap {config_map['metadata']['name']} holds {leaked}"


def test_secret_example_holds_only_placeholders_and_is_never_built(builds):
    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    assert example["kind"] == "Secret"
    assert set(example["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(example["stringData"].values()) == {"REPLACE_ME"}
    assert "data" not in example
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "secret.example.yaml" not in yaml.safe_load(kustomization.read_text()).get("resources", [])
    # Every pod that reads credentials names the Secret the example (and k8s/README.md) creates.
    for overlay, docs in builds.items():
        refs = {s["secretRef"]["name"] for _, c in containers(docs) for s in c.get("envFrom", []) if "secretRef" in s}
        assert refs == {example["metadata"]["name"]}, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_storage_settings_reach_every_pod_that_touches_storage(builds, overlay):
    docs = builds[overlay]
    config_map = one(docs, "ConfigMap")["metadata"]["name"]

    def sources(container):
        return {(kind, ref["name"]) for s in container.get("envFrom", []) for kind, ref in s.items()}
    storage_users = [c for doc in docs for cluster in ray_cluster_specs(doc)
                     for _, spec in ray_pod_specs(cluster) for c in spec["containers"][:1]]
    storage_users.append(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    for container in storage_users:
        assert ("configMapRef", config_map) in sources(container), container["name"]
        assert any(kind == "secretRef" for kind, _ in sources(container)), container["name"]
    # Pods that only submit jobs get the bucket name but no credentials.
    submitters = [one(docs, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0],
                  one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]]
    for container in submitters:
        assert sources(container) == {("configMapRef", config_map)}, container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_is_exposed_outside_the_cluster(builds, overlay):
    docs = builds[overlay]
    assert not {"Ingress", "Route", "Gateway", "HTTPRoute"} & {doc["kind"] for doc in docs}
    for service in of_kind(docs, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    for doc in docs:
        for cluster in ray_cluster_specs(doc):
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP"
            assert not head.get("enableIngress", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_without_privilege_escalation(builds, overlay):
    for doc in builds[overlay]:
        for where, spec in pod_specs(doc):
            context = spec.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, f"{doc['kind']}{where}: runAsNonRoot is not true"
            assert context.get("runAsUser", 1000) != 0
            for container in spec["containers"] + spec.get("initContainers", []):
                own = container.get("securityContext", {})
                assert own.get("runAsNonRoot", True) is True and own.get("runAsUser", 1000) != 0
                assert own.get("allowPrivilegeEscalation") is False, f"{doc['kind']}{where}:{container['name']}"
                assert not own.get("privileged", False)


# ---------------------------------------------------------------------------------------------
# Reviewer rules: hardening, over the pods as KubeRay will create them, for every kustomization

IMAGE_HOME = "/home/ray"  # HOME in the rayproject images (user "ray"), read-only under readOnlyRootFilesystem
OPERATOR_NAMESPACE = "kuberay-system"  # where k8s/README.md installs the KubeRay operator
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                   "app.kubernetes.io/component": "kuberay-operator"}  # its Helm chart's pod labels
RAY_HEAD_PORTS = {"dashboard": 8265, "client": 10001, "gcs-server": 6379}
TENSORBOARD_PORT = 6006
WRITABLE_VOLUMES = ("emptyDir", "ephemeral", "persistentVolumeClaim")
BUILD_NAMES = [directory.relative_to(K8S).as_posix() for directory in kustomization_dirs()] \
    + ["overlays/celeba+optional/raycronjob", "overlays/celeba+optional/serve"]


@pytest.fixture(scope="module")
def every_build(raycronjob_build, serve_build) -> dict[str, list[dict[str, Any]]]:
    """The output of every kustomization under k8s/, and of the celeba overlay with each optional component."""
    built = {directory.relative_to(K8S).as_posix(): kustomize(directory) for directory in kustomization_dirs()}
    built["overlays/celeba+optional/raycronjob"] = raycronjob_build
    built["overlays/celeba+optional/serve"] = serve_build
    return built


class Pod:
    """A pod as it will run: its labels and spec, with what KubeRay adds to Ray pods."""

    def __init__(self, where: str, namespace: str, labels: dict[str, str], spec: dict[str, Any],
                 ray_node: str | None = None, cluster: str | None = None, autoscaler: bool = False):
        self.where, self.namespace, self.labels, self.spec = where, namespace, labels, spec
        self.ray_node, self.cluster, self.autoscaler = ray_node, cluster, autoscaler

    def all_containers(self) -> list[dict[str, Any]]:
        return self.spec.get("initContainers", []) + self.spec["containers"]


def mount_empty_dir(spec: dict[str, Any], container: dict[str, Any], name: str, path: str, medium: str = "") -> None:
    """KubeRay's addEmptyDir: mount an emptyDir at `path` unless something is mounted there already."""
    if any(mount["mountPath"] == path for mount in container.get("volumeMounts", [])):
        return
    volumes = spec.setdefault("volumes", [])
    if not any(volume["name"] == name for volume in volumes):
        volumes.append({"name": name, "emptyDir": {"medium": medium} if medium else {}})
    container.setdefault("volumeMounts", []).append({"name": name, "mountPath": path})


def kuberay_pod(where: str, namespace: str, template: dict[str, Any], cluster: str, node_type: str, group: str,
                autoscaler_options: dict[str, Any] | None) -> Pod:
    """A head or worker pod as KubeRay v1.7.0 builds it from a group's template (controllers/ray/common/pod.go).

    Modelled: the labels (labelPod: KubeRay's own, then the template's, which may not replace node type, group or
    cluster), the workers' wait-gcs-ready init container (the Ray container's image, securityContext, env and
    volumeMounts), /dev/shm, and on an autoscaling head the autoscaler sidecar built from autoscalerOptions, which
    shares an emptyDir ray-logs at /tmp/ray with the Ray container.
    """
    spec = copy.deepcopy(template["spec"])
    labels = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update(template.get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group})
    ray = spec["containers"][0]
    if node_type == "worker":
        spec.setdefault("initContainers", []).append({
            "name": "wait-gcs-ready", "image": ray["image"], "command": ["/bin/bash", "-c", "--"],
            "args": ["until ray health-check --address HEAD:6379; do sleep 5; done"],
            "securityContext": copy.deepcopy(ray.get("securityContext")), "env": copy.deepcopy(ray.get("env", [])),
            "volumeMounts": copy.deepcopy(ray.get("volumeMounts", []))})
    mount_empty_dir(spec, ray, "shared-mem", "/dev/shm", "Memory")
    if autoscaler_options is not None:
        sidecar = {"name": "autoscaler", "image": ray["image"], "command": ["/bin/bash", "-c", "--"],
                   "args": ["ray kuberay-autoscaler --cluster-name $(RAY_CLUSTER_NAME) ..."],
                   "env": copy.deepcopy(autoscaler_options.get("env", [])),
                   "volumeMounts": copy.deepcopy(autoscaler_options.get("volumeMounts", []))}
        if "securityContext" in autoscaler_options:
            sidecar["securityContext"] = copy.deepcopy(autoscaler_options["securityContext"])
        spec["containers"].append(sidecar)
        for container in (ray, sidecar):
            mount_empty_dir(spec, container, "ray-logs", "/tmp/ray")
    return Pod(where, namespace, labels, spec, node_type, cluster, autoscaler_options is not None)


def pod_templates(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template (a mapping whose spec has a containers list) anywhere in a document."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and isinstance(node["spec"].get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from pod_templates(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from pod_templates(value, f"{where}[{index}]")


def deployed_pods(docs: list[dict[str, Any]]) -> list[Pod]:
    """Every pod the build makes, Ray pods as KubeRay makes them (a RayJob's cluster gets a generated name)."""
    pods = []
    for doc in docs:
        name, namespace = f"{doc['kind']}/{doc['metadata']['name']}", doc["metadata"].get("namespace", "default")
        ray_specs = set()
        for cluster in ray_cluster_specs(doc):
            cluster_name = doc["metadata"]["name"] + ("" if doc["kind"] == "RayCluster" else "-x7k2p")
            options = cluster.get("autoscalerOptions", {}) if cluster.get("enableInTreeAutoscaling") else None
            head = cluster["headGroupSpec"]["template"]
            pods.append(kuberay_pod(f"{name} head", namespace, head, cluster_name, "head", "headgroup", options))
            ray_specs.add(id(head["spec"]))
            for group in cluster.get("workerGroupSpecs", []):
                pods.append(kuberay_pod(f"{name} {group['groupName']}", namespace, group["template"], cluster_name,
                                        "worker", group["groupName"], None))
                ray_specs.add(id(group["template"]["spec"]))
        for where, template in pod_templates(doc):
            if id(template["spec"]) not in ray_specs:
                labels = template.get("metadata", {}).get("labels", {})
                pods.append(Pod(f"{name}{where}", namespace, dict(labels), template["spec"]))
    return pods


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {var["name"]: var["value"] for var in container.get("env", []) if "value" in var}


def written_paths(pod: Pod, container: dict[str, Any]) -> dict[str, str]:
    """The paths a container of the image is known to write, as its environment resolves them: path -> who."""
    env = literal_env(container)
    home = env.get("HOME", IMAGE_HOME)
    tmp = env.get("TMPDIR", "/tmp")
    cache = env.get("XDG_CACHE_HOME", f"{home}/.cache")
    writers = [
        (tmp, "tempfile: checkpoints being written, restored ones, TensorBoard event files, uploads"),
        (home, "HOME: ~/.nv's CUDA cache, ~/ray_results"),
        (cache, "~/.cache: pip"),
        (env.get("TORCH_HOME", f"{cache}/torch"), "the torch hub cache: the VGG16 weights"),
        (env.get("MPLCONFIGDIR", f"{home}/.config/matplotlib"), "matplotlib's config and font cache"),
        (env.get("TRITON_CACHE_DIR", f"{home}/.triton/cache"), "torch.compile's Triton kernels"),
    ]
    if pod.ray_node:
        # Ray's temp dir: $RAY_TMPDIR, else $TMPDIR on Linux, else /tmp; then "ray".
        ray_tmp = env.get("RAY_TMPDIR", tmp).rstrip("/") + "/ray"
        writers.append((ray_tmp, "Ray's session: logs, sockets, spilled objects"))
        if container is pod.spec["containers"][0]:
            writers.append(("/dev/shm", "Ray's object store"))
    argv = container.get("command", []) + container.get("args", [])
    if argv[:1] == ["tensorboard"] and "://" not in (option(argv, "--logdir") or "://"):
        writers.append((option(argv, "--logdir"), "TensorBoard's local logdir"))
    paths: dict[str, str] = {}
    for path, who in writers:
        paths[path] = f"{paths[path]}; {who}" if path in paths else who
    return paths


def writable_mount(path: str, container: dict[str, Any], spec: dict[str, Any]) -> str | None:
    """The writable volume a path lies on (its deepest mount), or None when it is on the root filesystem."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True):
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            volume = volumes.get(mount["name"], {})
            if mount.get("readOnly") or not any(kind in volume for kind in WRITABLE_VOLUMES):
                return None
            return mount["name"]
    return None


@pytest.mark.parametrize("build", BUILD_NAMES)
def test_every_container_has_a_read_only_root_and_a_writable_volume_wherever_it_writes(every_build, build):
    pods = deployed_pods(every_build[build])
    for pod in pods:
        for container in pod.all_containers():
            where = f"{pod.where}:{container['name']}"
            own = container.get("securityContext") or {}
            assert own.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem is not true"
            paths = written_paths(pod, container)
            if pod.ray_node and container is pod.spec["containers"][0]:
                assert {"/tmp", "/tmp/ray", "/dev/shm"} <= set(paths), where
            for path, who in paths.items():
                assert writable_mount(path, container, pod.spec), \
                    f"{where}: {path} ({who}) is on the read-only root filesystem, not on a writable volume"
    if any(pod.ray_node for pod in pods):
        assert any(pod.autoscaler for pod in pods), \
            "the long-lived cluster autoscales: its autoscaler sidecar must be among the pods checked"


@pytest.mark.parametrize("build", BUILD_NAMES)
def test_every_container_drops_capabilities_and_privilege_escalation_under_runtime_default_seccomp(
        every_build, build):
    for pod in deployed_pods(every_build[build]):
        context = pod.spec.get("securityContext", {})
        for container in pod.all_containers():
            where, own = f"{pod.where}:{container['name']}", container.get("securityContext") or {}
            assert own.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false"
            assert "ALL" in own.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped"
            assert not own.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
            assert not own.get("privileged", False), where
            assert own.get("runAsNonRoot", context.get("runAsNonRoot")) is True, f"{where}: may run as root"
            assert own.get("runAsUser", context.get("runAsUser", 1000)) != 0, where
            seccomp = own.get("seccompProfile", context.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccompProfile is not RuntimeDefault"


@pytest.mark.parametrize("build", BUILD_NAMES)
def test_only_the_autoscaling_head_mounts_a_service_account_token(every_build, build):
    pods = deployed_pods(every_build[build])
    for pod in pods:
        token = pod.spec.get("automountServiceAccountToken")
        if pod.autoscaler:
            # The autoscaler sidecar scales the workers through the Kubernetes API with KubeRay's ServiceAccount.
            assert token is not False, f"{pod.where}: the autoscaler sidecar needs the ServiceAccount token"
        else:
            assert token is False, \
                f"{pod.where}: needs no Kubernetes API access, set automountServiceAccountToken: false"


class Source:
    """Where a connection comes from: a pod (namespace, its labels, the pod's labels), or outside the cluster."""

    def __init__(self, name: str, namespace: str | None = None, labels: dict[str, str] | None = None):
        self.name, self.namespace, self.labels = name, namespace, labels or {}
        self.namespace_labels = {"kubernetes.io/metadata.name": namespace} if namespace else {}


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a label set; {} matches everything."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return True


def peer_admits(peer: dict[str, Any], source: Source, namespace: str) -> bool:
    if "ipBlock" in peer:
        return True  # an address range can hold anything, outside the cluster as well as inside
    if source.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], source.namespace_labels):
            return False
    elif source.namespace != namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), source.labels)


def port_admits(rule: dict[str, Any], port: int, pod: Pod) -> bool:
    if not rule.get("ports"):
        return True
    named = {p["name"]: p["containerPort"] for c in pod.spec["containers"] for p in c.get("ports", []) if "name" in p}
    for allowed in rule["ports"]:
        if allowed.get("protocol", "TCP") != "TCP":
            continue
        number = named.get(allowed["port"]) if isinstance(allowed.get("port"), str) else allowed.get("port")
        if "port" not in allowed or number == port \
                or (number is not None and number <= port <= allowed.get("endPort", 0)):
            return True
    return False


def ingress_allowed(docs: list[dict[str, Any]], pod: Pod, port: int, source: Source) -> bool:
    """Whether the build's NetworkPolicies let `source` open a TCP connection to `pod` on `port`."""
    selecting = [policy["spec"] for policy in of_kind(docs, "NetworkPolicy")
                 if policy["metadata"]["namespace"] == pod.namespace
                 and "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
                 and selector_matches(policy["spec"]["podSelector"], pod.labels)]
    if not selecting:
        return True  # a pod no policy selects takes any traffic
    return any(port_admits(rule, port, pod)
               and (not rule.get("from") or any(peer_admits(peer, source, pod.namespace) for peer in rule["from"]))
               for spec in selecting for rule in spec.get("ingress", []))


def test_ingress_model_reads_network_policies_as_kubernetes_does():
    pod = Pod("p", "ns", {"app": "web"},
              {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]})
    inside, elsewhere = Source("inside", "ns", {"x": "y"}), Source("elsewhere", "other", {"x": "y"})

    def policy(ingress):
        return {"kind": "NetworkPolicy", "metadata": {"namespace": "ns"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": ingress}}
    assert ingress_allowed([], pod, 80, elsewhere)  # no policy: open
    deny = [policy([])]
    assert not ingress_allowed(deny, pod, 80, inside)
    same_namespace = [policy([{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}])]
    assert ingress_allowed(same_namespace, pod, 80, inside) and not ingress_allowed(same_namespace, pod, 81, inside)
    assert not ingress_allowed(same_namespace, pod, 80, elsewhere)
    any_namespace = [policy([{"from": [{"namespaceSelector": {}}]}])]
    assert ingress_allowed(any_namespace, pod, 80, elsewhere)
    assert not ingress_allowed(any_namespace, pod, 80, Source("outside the cluster"))
    assert ingress_allowed([policy([{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}])], pod, 80, Source("internet"))
    assert ingress_allowed([policy([{}])], pod, 80, Source("internet"))  # a rule with no from admits everyone
    assert ingress_allowed(deny + same_namespace, pod, 80, inside)  # policies add up


def outside_sources(head_labels: dict[str, str]) -> list[Source]:
    """Connections that must not reach the dashboard, Ray Client, the GCS or TensorBoard."""
    return [Source("outside the cluster"), Source("a pod of another namespace", "other"),
            Source("a Ray pod of another namespace", "other", head_labels),
            Source("a pod labelled as the operator in another namespace", "other", OPERATOR_LABELS),
            Source("another pod of the operator's namespace", OPERATOR_NAMESPACE, {"app": "something-else"})]


@pytest.mark.parametrize("build", BUILD_NAMES)
def test_dashboard_ray_ports_and_tensorboard_admit_only_the_namespace_and_the_operator(every_build, build):
    if build.startswith("optional/"):
        pytest.skip("a component alone lacks the base's policies; it is checked inside an overlay's build")
    docs = every_build[build]
    pods = deployed_pods(docs)
    heads = [pod for pod in pods if pod.ray_node == "head"]
    boards = [pod for pod in pods if any(c.get("command", [])[:1] == ["tensorboard"] for c in pod.spec["containers"])]
    assert heads and boards, "every build of the system has Ray heads and TensorBoard"
    operator = Source("the KubeRay operator", OPERATOR_NAMESPACE, OPERATOR_LABELS)
    for pod in heads + boards:
        ports = RAY_HEAD_PORTS.values() if pod.ray_node else [TENSORBOARD_PORT]
        neighbours = [Source("a job submitter of the namespace", pod.namespace, {"job-name": "evaluate-1"}),
                      Source("any pod of the namespace", pod.namespace)]
        for port in ports:
            for source in neighbours:
                assert ingress_allowed(docs, pod, port, source), f"{pod.where}: {source.name} cannot reach {port}"
            for source in outside_sources(heads[0].labels if heads else {}):
                assert not ingress_allowed(docs, pod, port, source), f"{pod.where}: {source.name} reaches {port}"
            # The operator polls every RayJob's state from the dashboard, and nothing else.
            wanted = port == RAY_HEAD_PORTS["dashboard"] and pod.ray_node == "head"
            assert ingress_allowed(docs, pod, port, operator) == wanted, f"{pod.where}: operator on {port}"


@pytest.mark.parametrize("build", BUILD_NAMES)
def test_ray_nodes_of_a_cluster_reach_each_other_on_every_port(every_build, build):
    if build.startswith("optional/"):
        pytest.skip("a component alone lacks the base's policies; it is checked inside an overlay's build")
    docs = every_build[build]
    ray_pods = [pod for pod in deployed_pods(docs) if pod.ray_node]
    # GCS, dashboard, client, dashboard agent, object manager, node manager, a worker port, metrics
    ports = (6379, 8265, 10001, 52365, 8076, 8077, 10002, 19999, 8080)
    for target in ray_pods:
        for peer in ray_pods:
            if peer.cluster == target.cluster and peer.namespace == target.namespace:
                for port in ports:
                    assert ingress_allowed(docs, target, port, Source(peer.where, peer.namespace, peer.labels)), \
                        f"{peer.where} cannot reach {target.where} on {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_that_listen_on_nothing_take_no_ingress(builds, overlay):
    docs = builds[overlay]
    for pod in deployed_pods(docs):
        if not pod.ray_node and not any(c.get("ports") for c in pod.spec["containers"]):
            assert not ingress_allowed(docs, pod, 8080, Source("any pod of the namespace", pod.namespace)), pod.where


# ---------------------------------------------------------------------------------------------
# The optional RayCronJob component


def test_raycronjob_component_replaces_the_cronjob(raycronjob_build, builds):
    docs = raycronjob_build
    assert of_kind(docs, "CronJob") == [] and of_kind(docs, "ServiceAccount") == []
    cron = one(docs, "RayCronJob")
    template = cron["spec"]["jobTemplate"]
    cluster = one(docs, "RayCluster")
    assert template["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # HTTPMode: the shell on the Ray cluster expands the entrypoint, with the Ray pods' environment.
    assert template["submissionMode"] == "HTTPMode"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    entrypoint = expand(template["entrypoint"], container_env(head, docs), "RayCronJob entrypoint")
    script, args = parse_python_command(shlex.split(entrypoint), "RayCronJob entrypoint")
    _, train = training(builds["celeba"])
    assert script == "jobs/evaluate.py" and args.watch == f"{train.storage}/{train.name}"
    assert template["entrypointNumGpus"] >= 1


def test_raycronjob_component_matches_the_kuberay_crd(raycronjob_build, kuberay_validators):
    assert kuberay_errors(kuberay_validators, one(raycronjob_build, "RayCronJob")) == []


# ---------------------------------------------------------------------------------------------
# cluster/ray-cluster.yaml (`ray up` on VMs)


def test_ray_cluster_launcher_config_is_valid_and_uses_the_same_image():
    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    ray_package = Path(importlib.util.find_spec("ray").origin).parent  # found without importing Ray
    schema = json.loads((ray_package / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # Ray's own schema for `ray up` configs
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, f"cluster/ray-cluster.yaml has no {key}"
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert node_types[config["head_node_type"]]["resources"].get("CPU") == 0, "the head takes no training work"
    workers = [t for name, t in node_types.items() if name != config["head_node_type"]]
    assert workers and sum(t.get("max_workers", 0) for t in workers) <= config["max_workers"]
    image = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"][0]
    k8s_image = f"{image['newName']}:{image['newTag']}"
    assert config["docker"]["image"] == k8s_image, "`ray up` and Kubernetes should run the same image"
    assert IMAGE_TAG.match(k8s_image.rsplit(":", 1)[1])["ray"] == pinned_ray_version()


# ---------------------------------------------------------------------------------------------
# The optional serving component (a RayService)

SERVE_PORT = 8000


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The RayService's serveConfigV2, parsed."""
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def test_serve_component_matches_the_kuberay_crd(serve_build, kuberay_validators):
    assert kuberay_errors(kuberay_validators, one(serve_build, "RayService")) == []


def test_crd_validator_rejects_a_misspelled_rayservice_field(serve_build, kuberay_validators):
    service = copy.deepcopy(one(serve_build, "RayService"))
    service["spec"]["serveConfigV2s"] = service["spec"].pop("serveConfigV2")
    assert any("serveConfigV2s" in error for error in kuberay_errors(kuberay_validators, service))


def test_rayservice_serves_the_training_run_with_the_app_in_this_repo(serve_build, monkeypatch):
    import cluster.serve

    docs = serve_build
    config = serve_config(docs)
    [app] = config["applications"]
    assert config["http_options"]["port"] == SERVE_PORT and config["http_options"]["host"] == "0.0.0.0"
    assert app["import_path"] == "cluster.serve:app_builder" and app["route_prefix"] == "/"
    # $INPAINT_BUCKET is expanded in the pods' environment: the ConfigMap every Ray pod loads.
    head = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    bucket = container_env(head, docs)["INPAINT_BUCKET"]
    monkeypatch.setenv("INPAINT_BUCKET", bucket)
    built = cluster.serve.app_builder(app["args"])  # the args build the app (unknown options raise)
    options = built._bound_deployment.init_args[0]
    _, train = training(docs)
    assert options["checkpoint"] == f"{train.storage.rstrip('/')}/{train.name}".replace("${INPAINT_BUCKET:?}", bucket)
    assert options["follow"] in ("newest", "best") and options["device"] == "cuda"
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    assert set(deployments) <= {cluster.serve.InpaintServer.name}
    replicas = deployments.get(cluster.serve.InpaintServer.name, {}).get("num_replicas", 1)
    cluster_spec = one(docs, "RayService")["spec"]["rayClusterConfig"]
    gpu_slots = sum(group["maxReplicas"] * gpus(group["template"]["spec"]["containers"][0])
                    for group in cluster_spec["workerGroupSpecs"])
    assert 1 <= replicas <= gpu_slots, "each replica takes a GPU: the worker groups must be able to hold them all"
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayservice_ray_containers_have_probes_and_expose_the_serve_port(serve_build):
    cluster_spec = one(serve_build, "RayService")["spec"]["rayClusterConfig"]
    for group, spec in ray_pod_specs(cluster_spec):
        container = spec["containers"][0]
        assert {"readinessProbe", "livenessProbe"} <= set(container), f"{group}: no probes"
        if group != "head":
            probe = container["readinessProbe"]["httpGet"]
            assert probe["port"] == SERVE_PORT, f"{group}: ready should mean the Serve proxy answers"
        assert any(port["containerPort"] == SERVE_PORT and port.get("name") == "serve"
                   for port in container.get("ports", [])), f"{group}: no port named serve"


def test_serve_port_admits_the_namespace_and_nothing_outside(serve_build):
    docs = serve_build
    serving = [pod for pod in deployed_pods(docs) if pod.ray_node and pod.where.startswith("RayService/")]
    assert {pod.ray_node for pod in serving} == {"head", "worker"}
    for pod in serving:
        assert ingress_allowed(docs, pod, SERVE_PORT, Source("any pod of the namespace", pod.namespace)), pod.where
        for source in outside_sources(pod.labels):
            assert not ingress_allowed(docs, pod, SERVE_PORT, source), f"{pod.where}: {source.name} reaches the API"
    # The long-lived cluster and the training cluster do not serve: the policy does not open 8000 on them.
    others = [pod for pod in deployed_pods(docs) if pod.ray_node and not pod.where.startswith("RayService/")]
    assert others and not any(ingress_allowed(docs, pod, SERVE_PORT, Source("outside the cluster"))
                              for pod in others)
