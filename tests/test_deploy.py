"""Offline checks of the deployment files: Dockerfile, .dockerignore, compose.yaml and k8s/.

No Docker engine and no cluster: YAML syntax and lint, Kubernetes schemas (strict), kustomize
structure, rendering when a kustomize or kubectl binary is on PATH, and the sidecar invariants.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest
import yaml

REPO: Final = Path(__file__).resolve().parents[1]
K8S: Final = REPO / "k8s"
BASE: Final = K8S / "base"
OVERLAYS: Final = K8S / "overlays"
COMPOSE: Final = REPO / "compose.yaml"
DOCKERFILE: Final = REPO / "Dockerfile"
DOCKERIGNORE: Final = REPO / ".dockerignore"
YAMLLINT_CONFIG: Final = REPO / ".yamllint.yaml"
CONFIG_DOC: Final = REPO / "docs" / "configuration.md"

# The oldest release with every field the manifests use: the preStop `sleep` action is beta
# and on by default from 1.30.
K8S_VERSION: Final = "1.30.0"
VALIDATORS: Final[Mapping[str, str]] = {
    "kubernetes_validate": "kubernetes-validate==1.37.0",
    "yamllint": "yamllint==1.38.0",
    "jsonschema": "jsonschema (kubernetes-validate depends on it)",
}
# Rendering a kustomization takes well under a second; the bound only stops a hung binary.
RENDER_TIMEOUT_S: Final = 120

PROXY: Final = "mes-trace-proxy"
CONSTRAINTS: Final = "constraints.txt"
BUILD_PIP: Final = "/opt/build/bin/pip"
MES: Final = "mes"
PROXY_CONFIG_MAP: Final = "mes-trace-proxy-config"
STATE_DIR: Final = "/var/lib/mes-trace-proxy"
PROXY_UID: Final = 10001
PROXY_PORTS: Final = frozenset({8080, 8090, 9901})
# Containers that run our image: their variables must be ones docs/configuration.md lists.
OUR_CONTAINERS: Final = frozenset({PROXY, "crm-simulator"})
JAEGER_OBJECT_NAMES: Final = frozenset({"jaeger", "jaeger-config", "mes-to-jaeger"})

DURATION_UNITS_S: Final[Mapping[str, float]] = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION: Final = re.compile(r"^(\d+)(ms|s|m|h|d)$")
# `NAME`, `NAME=value` or `PREFIX_*` in backticks; a name has at least one underscore, which
# leaves out size units such as `B`.
DOC_ENV_NAME: Final = re.compile(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(_\*|=[^`]*)?`")
DOC_CONFIG_BLOCK: Final = re.compile(r"## Config file\n\n```yaml\n(.*?)```", re.DOTALL)

Doc = dict[str, Any]


# ── loading ─────────────────────────────────────────────────────────────────────────────────


def _require(module: str) -> ModuleType:
    """Import a validator, failing (never skipping) with the install line when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: pip install '{VALIDATORS[module]}' (dev extra)")


def _closed(properties: Mapping[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON schema object that admits only ``properties`` (a misspelt field fails)."""
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": required}


_STRING_MAP: Final = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META: Final = _closed({"name": {"type": "string"}, "labels": _STRING_MAP}, ["name"])
# Custom resources have no schema in kubernetes-validate: each kind the manifests use is checked
# against the subset of its CRD's schema they use, closed like strict validation. PodMonitor:
# the Prometheus Operator's monitoring.coreos.com/v1 (podMetricsEndpoints[].authorization is
# a SafeAuthorization: a type and a Secret key selector in the monitor's namespace).
CUSTOM_SCHEMAS: Final[Mapping[tuple[str, str], Mapping[str, Any]]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _closed(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _OBJECT_META,
            "spec": _closed(
                {
                    "selector": _closed({"matchLabels": _STRING_MAP}, ["matchLabels"]),
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": _closed(
                            {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "authorization": _closed(
                                    {
                                        "type": {"const": "Bearer"},
                                        "credentials": _closed(
                                            {"name": {"type": "string"}, "key": {"type": "string"}},
                                            ["name", "key"],
                                        ),
                                    },
                                    ["credentials"],
                                ),
                            },
                            ["port"],
                        ),
                    },
                },
                ["selector", "podMetricsEndpoints"],
            ),
        },
        ["apiVersion", "kind", "metadata", "spec"],
    ),
}


def _validate(doc: Mapping[str, Any]) -> None:
    """Validate one object against the strict Kubernetes schema, failing with a one-line reason."""
    custom = CUSTOM_SCHEMAS.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
    if custom is not None:
        jsonschema = _require("jsonschema")
        try:
            jsonschema.validate(dict(doc), custom)
        except jsonschema.ValidationError as error:
            where = "/".join(str(part) for part in error.absolute_path)
            reason = f"{'/'.join(_key(doc))} (custom resource): {error.message} at /{where}"
        else:
            return
        pytest.fail(reason)
    validator = _require("kubernetes_validate")
    try:
        validator.validate(dict(doc), K8S_VERSION, strict=True)
    except (validator.ValidationError, validator.SchemaNotFoundError) as error:
        where = "/".join(str(part) for part in getattr(error, "absolute_path", ()))
        reason = f"{'/'.join(_key(doc))} ({K8S_VERSION}): {error.message} at /{where}"
    else:
        return
    # Outside the except block, so the report is the one line, not the whole schema.
    pytest.fail(reason)


def _load_all(path: Path) -> tuple[Doc, ...]:
    with path.open(encoding="utf-8") as stream:
        return tuple(doc for doc in yaml.safe_load_all(stream) if doc is not None)


def _load_one(path: Path) -> Doc:
    (doc,) = _load_all(path)
    return doc


def _k8s_yaml_files() -> tuple[Path, ...]:
    return (*sorted(K8S.rglob("*.yaml")), *sorted(K8S.rglob("*.yml")))


def _yaml_files() -> tuple[Path, ...]:
    return (COMPOSE, YAMLLINT_CONFIG, *_k8s_yaml_files())


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _key(doc: Mapping[str, Any]) -> tuple[str, str]:
    return (str(doc["kind"]), str(doc["metadata"]["name"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Kustomization:
    """One kustomization.yaml and the files and directories it names."""

    directory: Path
    resources: tuple[Path, ...]
    patch_files: tuple[Path, ...]
    #: files a configMapGenerator turns into ConfigMaps (``key=path`` entries by their path)
    generated_from: tuple[Path, ...]
    inline_patches: tuple[str, ...]
    patch_targets: tuple[Mapping[str, Any], ...]


def _kustomization(directory: Path) -> Kustomization:
    doc = _load_one(directory / "kustomization.yaml")
    patches: Sequence[Mapping[str, Any]] = doc.get("patches", ())
    generators: Sequence[Mapping[str, Any]] = doc.get("configMapGenerator", ())
    return Kustomization(
        directory=directory,
        resources=tuple((directory / entry).resolve() for entry in doc.get("resources", ())),
        patch_files=tuple((directory / p["path"]).resolve() for p in patches if "path" in p),
        generated_from=tuple(
            (directory / str(entry).rpartition("=")[2]).resolve()
            for generator in generators
            for entry in generator.get("files", ())
        ),
        inline_patches=tuple(str(p["patch"]) for p in patches if "patch" in p),
        patch_targets=tuple(p["target"] for p in patches if "target" in p),
    )


def _kustomization_dirs() -> tuple[Path, ...]:
    return tuple(sorted(path.parent for path in K8S.rglob("kustomization.yaml")))


def _objects(directory: Path) -> tuple[Doc, ...]:
    """Every object a kustomization's resources hold, before patches, recursing into bases."""
    found: list[Doc] = []
    for resource in _kustomization(directory).resources:
        found.extend(_objects(resource) if resource.is_dir() else _load_all(resource))
    return tuple(found)


def _own_resource_files() -> tuple[Path, ...]:
    return tuple(
        sorted(
            {path for d in _kustomization_dirs() for path in _kustomization(d).resources if path.is_file()}
        )
    )


def _patch_docs(kustomization: Kustomization) -> tuple[Doc, ...]:
    inline = tuple(yaml.safe_load(text) for text in kustomization.inline_patches)
    return tuple(doc for path in kustomization.patch_files for doc in _load_all(path)) + inline


def _base(kind: str, name: str) -> Doc:
    (doc,) = (doc for doc in _objects(BASE) if _key(doc) == (kind, name))
    return doc


def _pod_spec(workload: Mapping[str, Any]) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _container(workload: Mapping[str, Any], name: str) -> Doc:
    matches: list[Doc] = [c for c in _pod_spec(workload)["containers"] if c["name"] == name]
    (container,) = matches
    return container


def _containers(docs: Sequence[Mapping[str, Any]]) -> Iterator[Doc]:
    for doc in docs:
        template = doc.get("spec", {}).get("template", {})
        yield from template.get("spec", {}).get("containers", ())


def _proxy_config() -> Doc:
    config: Doc = yaml.safe_load(_base("ConfigMap", PROXY_CONFIG_MAP)["data"]["config.yaml"])
    return config


def _seconds(duration: str) -> float:
    match = DURATION.match(duration)
    assert match is not None, f"not a duration: {duration!r}"
    return int(match[1]) * DURATION_UNITS_S[match[2]]


def _port_of(container: Mapping[str, Any], port: int | str) -> int | None:
    """The containerPort a probe or Service port (number or name) means, or None."""
    for entry in container.get("ports", ()):
        if port in (entry["containerPort"], entry.get("name")):
            return int(entry["containerPort"])
    return None


def _documented_env() -> tuple[frozenset[str], frozenset[str]]:
    """(names, prefixes) of the variables docs/configuration.md lists."""
    text = CONFIG_DOC.read_text(encoding="utf-8")
    found = DOC_ENV_NAME.findall(text)
    names = frozenset(name for name, suffix in found if suffix != "_*")
    prefixes = frozenset(f"{name}_" for name, suffix in found if suffix == "_*")
    return names, prefixes


def _documented_config_keys() -> Doc:
    match = DOC_CONFIG_BLOCK.search(CONFIG_DOC.read_text(encoding="utf-8"))
    assert match is not None, "docs/configuration.md has no ```yaml block under '## Config file'"
    doc: Doc = yaml.safe_load(match[1])
    return doc


def _undocumented_keys(ours: Any, documented: Any, where: str) -> Iterator[str]:
    """Keys in our config that the documented example does not have, at any depth."""
    if isinstance(ours, dict) and isinstance(documented, dict):
        for key, value in ours.items():
            if key not in documented:
                yield f"{where}.{key}"
            else:
                yield from _undocumented_keys(value, documented[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(documented, list) and documented:
        for index, item in enumerate(ours):
            yield from _undocumented_keys(
                item, documented[min(index, len(documented) - 1)], f"{where}[{index}]"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


def _dockerfile_stages() -> tuple[tuple[Instruction, ...], ...]:
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[Instruction]] = [[]]
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword=keyword.upper(), args=args.strip()))
    return tuple(tuple(stage) for stage in stages)


def _args(stage: Sequence[Instruction], keyword: str) -> tuple[str, ...]:
    return tuple(i.args for i in stage if i.keyword == keyword)


def _exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _env(stage: Sequence[Instruction]) -> dict[str, str]:
    pairs = (word.partition("=") for args in _args(stage, "ENV") for word in shlex.split(args))
    return {key: value for key, _, value in pairs}


def _resolved_from_images() -> tuple[str, ...]:
    preamble, *stages = _dockerfile_stages()
    defaults = dict(arg.partition("=")[::2] for arg in _args(preamble, "ARG"))
    images = (stage[0].args.split()[0] for stage in stages)
    return tuple(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], image) for image in images)


# ── YAML: syntax, lint, schema ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses(path: Path) -> None:
    """Every YAML file parses with safe_load_all and holds at least one document."""
    assert _load_all(path)


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yamllint_clean(path: Path) -> None:
    """Every YAML file passes yamllint with the repository's .yamllint.yaml."""
    _require("yamllint")
    config = importlib.import_module("yamllint.config").YamlLintConfig(file=str(YAMLLINT_CONFIG))
    linter = importlib.import_module("yamllint.linter")
    problems = [str(p) for p in linter.run(path.read_text(encoding="utf-8"), config, str(path))]
    assert problems == []


@pytest.mark.parametrize("path", _own_resource_files(), ids=_rel)
def test_manifest_matches_kubernetes_schema(path: Path) -> None:
    """Every resource file a kustomization names validates against the Kubernetes schema, strictly."""
    for doc in _load_all(path):
        _validate(doc)


def test_every_yaml_under_k8s_is_used() -> None:
    """Every YAML file under k8s/ is a kustomization, or a resource, patch or generator file one names."""
    patches = {path for d in _kustomization_dirs() for path in _kustomization(d).patch_files}
    generated = {path for d in _kustomization_dirs() for path in _kustomization(d).generated_from}
    kustomizations = {(d / "kustomization.yaml").resolve() for d in _kustomization_dirs()}
    used = set(_own_resource_files()) | patches | generated | kustomizations
    orphans = [_rel(p) for p in _k8s_yaml_files() if p.resolve() not in used]
    assert orphans == []


# ── kustomize ───────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("directory", _kustomization_dirs(), ids=_rel)
def test_kustomization_names_existing_files(directory: Path) -> None:
    """Every resource, patch and generator file a kustomization names exists."""
    kustomization = _kustomization(directory)
    named = kustomization.resources + kustomization.patch_files + kustomization.generated_from
    missing = [str(p) for p in named if not p.exists()]
    assert missing == []
    assert all((p / "kustomization.yaml").is_file() for p in kustomization.resources if p.is_dir())


@pytest.mark.parametrize("directory", _kustomization_dirs(), ids=_rel)
def test_patches_target_existing_objects(directory: Path) -> None:
    """Every strategic-merge patch (and patch target) names a kind+name its resources hold."""
    kustomization = _kustomization(directory)
    available = {_key(doc) for doc in _objects(directory)}
    wanted = {_key(doc) for doc in _patch_docs(kustomization)}
    wanted |= {(str(t["kind"]), str(t["name"])) for t in kustomization.patch_targets}
    assert wanted - available == set()


def test_existing_collector_drops_every_jaeger_object() -> None:
    """The existing-collector overlay deletes every bundled Jaeger object and re-points OTLP."""
    overlay = _kustomization(OVERLAYS / "existing-collector")
    docs = _patch_docs(overlay)
    deleted = {_key(doc) for doc in docs if doc.get("$patch") == "delete"}
    jaeger = {_key(doc) for doc in _objects(BASE) if doc["metadata"]["name"] in JAEGER_OBJECT_NAMES}
    assert jaeger
    assert jaeger <= deleted
    env = {
        e["name"]: e.get("value") for c in _containers(docs) if c["name"] == PROXY for e in c.get("env", ())
    }
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"


def _kustomize_command() -> tuple[str, ...] | None:
    if (kustomize := shutil.which("kustomize")) is not None:
        return (kustomize, "build")
    if (kubectl := shutil.which("kubectl")) is not None:
        return (kubectl, "kustomize")
    return None


@pytest.mark.parametrize("directory", _kustomization_dirs(), ids=_rel)
def test_kustomization_renders_to_valid_objects(directory: Path) -> None:
    """Each kustomization renders, and every rendered object validates against the schema."""
    _require("kubernetes_validate")
    command = _kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl on PATH: structure is checked by the tests above")
    result = subprocess.run(
        (*command, str(directory)), capture_output=True, text=True, timeout=RENDER_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)
    assert rendered
    for doc in rendered:
        _validate(doc)
    if directory.name == "existing-collector":
        assert [name for _, name in map(_key, rendered) if "jaeger" in name] == []
    if directory.name == "demo":
        assert {doc["metadata"].get("namespace") for doc in rendered if doc["kind"] != "Namespace"} == {
            "mes-demo"
        }


# ── the sidecar pod ─────────────────────────────────────────────────────────────────────────


def test_service_targets_the_proxy_not_mes() -> None:
    """The mes Service's targetPort is the proxy's 8080 and no port of the MES container."""
    deployment, service = _base("Deployment", MES), _base("Service", MES)
    (port,) = service["spec"]["ports"]
    assert _port_of(_container(deployment, PROXY), port["targetPort"]) == 8080
    assert _port_of(_container(deployment, MES), port["targetPort"]) is None
    assert service["spec"]["type"] == "ClusterIP"


def test_mes_listens_where_the_proxy_forwards() -> None:
    """The MES container's port is the ingress listener's upstream port on loopback."""
    (ingress, _egress) = _proxy_config()["listeners"]
    assert ingress["upstream"] == "http://127.0.0.1:8081"
    assert _port_of(_container(_base("Deployment", MES), MES), 8081) == 8081


def test_termination_grace_exceeds_prestop_plus_drain() -> None:
    """terminationGracePeriodSeconds leaves room for the preStop sleep plus the proxy's drain."""
    deployment = _base("Deployment", MES)
    pre_stop = _container(deployment, PROXY)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = _seconds(_proxy_config()["server"]["grace_period"])
    assert _pod_spec(deployment)["terminationGracePeriodSeconds"] > pre_stop + drain


SECURITY_CONTEXT: Final[Sequence[tuple[str, Callable[[Doc], object], object]]] = (
    ("runAsNonRoot", lambda sc: sc["runAsNonRoot"], True),
    ("runAsUser", lambda sc: sc["runAsUser"], PROXY_UID),
    ("readOnlyRootFilesystem", lambda sc: sc["readOnlyRootFilesystem"], True),
    ("allowPrivilegeEscalation", lambda sc: sc["allowPrivilegeEscalation"], False),
    ("capabilities.drop", lambda sc: sc["capabilities"]["drop"], ["ALL"]),
    ("seccompProfile.type", lambda sc: sc["seccompProfile"]["type"], "RuntimeDefault"),
)


@pytest.mark.parametrize(
    ("read", "expected"), [c[1:] for c in SECURITY_CONTEXT], ids=[c[0] for c in SECURITY_CONTEXT]
)
def test_proxy_security_context(read: Callable[[Doc], object], expected: object) -> None:
    """The proxy container sets each hardening field itself, not only through the pod."""
    assert read(_container(_base("Deployment", MES), PROXY)["securityContext"]) == expected


def test_proxy_config_names_both_listeners() -> None:
    """The ConfigMap's config parses and names listeners ingress and egress on the agreed ports."""
    config = _proxy_config()
    ingress, egress = config["listeners"]
    assert (ingress["name"], ingress["listen"]) == ("ingress", "0.0.0.0:8080")
    assert (egress["name"], egress["listen"]) == ("egress", "127.0.0.1:8090")
    assert egress["upstream"].startswith("http")
    assert config["admin"]["listen"] == "0.0.0.0:9901"
    assert config["watchdog"]["state"].startswith(f"sqlite:///{STATE_DIR}/")


def test_proxy_config_uses_only_documented_keys() -> None:
    """Every key of the ConfigMap's config appears in docs/configuration.md's config example."""
    assert list(_undocumented_keys(_proxy_config(), _documented_config_keys(), "config")) == []


def _read_bytes(name: str) -> bytes:
    return Path(name).read_bytes()


def test_proxy_config_loads_with_the_real_loader(tmp_path: Path) -> None:
    """The ConfigMap's config, with the pod's files in place (the Secret filled as a deployer
    fills it), passes the real config loader."""
    # Imported here so a broken config module fails this test, not the whole file's collection.
    from mes_trace_proxy.core.config import load_config

    objects, _ = _filled_by_the_deployer(_objects(BASE))
    pod = _materialize_proxy(objects, tmp_path)
    file_doc = yaml.safe_load(pod.config_file.read_text(encoding="utf-8"))
    rules = yaml.safe_load(resources.files("mes_trace_proxy").joinpath("defaults/rules.yaml").read_text())
    config = load_config(flags={}, environ={}, file_doc=file_doc, defaults=rules, read_file=_read_bytes)
    assert [listener.name for listener in config.listeners] == ["ingress", "egress"]
    assert config.server.grace_period == _seconds(_proxy_config()["server"]["grace_period"])
    assert config.admin.tokens.enabled


# ── the proxy started from the manifests ────────────────────────────────────────────────────

ADMIN_TOKENS_SECRET: Final = "mes-trace-proxy-admin-tokens"
# What the downward API would give the proxy.
FIELD_VALUES: Final[Mapping[str, str]] = {
    "metadata.name": "mes-7d9f-abcde",
    "metadata.namespace": "mes",
    "spec.nodeName": "node-1",
}
EXPOSURE_WARNING: Final = "the admin listener is reachable beyond loopback without tokens"
# Start-up takes a second or two; the bound only stops a hung child.
START_TIMEOUT_S: Final = 60


def _secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    decoded = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    return {**decoded, **secret.get("stringData", {})}


def _filled_by_the_deployer(objects: Sequence[Doc]) -> tuple[tuple[Doc, ...], Mapping[str, str]]:
    """The objects with the token Secret replaced as its comment and docs/deployment.md say.

    Two fresh tokens of ``openssl rand -hex 32`` (64 hex digits: what :func:`secrets.token_hex`
    gives), then ``kubectl create secret generic … --from-literal=tokens="$(printf
    'viewer:%s\nadmin:%s' …)" --from-literal=viewer=…``: base64 ``data``, no ``stringData``.

    Returns:
        The objects, and the tokens by role.
    """
    tokens = {"viewer": secrets.token_hex(32), "admin": secrets.token_hex(32)}
    literals = {"tokens": "viewer:{viewer}\nadmin:{admin}".format_map(tokens), "viewer": tokens["viewer"]}

    def filled(doc: Doc) -> Doc:
        if _key(doc) != ("Secret", ADMIN_TOKENS_SECRET):
            return doc
        data = {key: base64.b64encode(value.encode()).decode() for key, value in literals.items()}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": doc["metadata"],
            "type": "Opaque",
            "data": data,
        }

    replaced = tuple(filled(doc) for doc in objects)
    assert replaced != tuple(objects), f"no Secret {ADMIN_TOKENS_SECRET} to fill"
    return replaced, tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class MaterializedPod:
    """The proxy container of the rendered manifests, laid out under a temporary directory."""

    #: the container's args with every mount path pointing into the directory
    args: tuple[str, ...]
    #: the container's environment (downward-API fields filled in)
    env: Mapping[str, str]
    #: the config file the args name
    config_file: Path


def _materialize_proxy(objects: Sequence[Mapping[str, Any]], root: Path) -> MaterializedPod:
    """Write what each of the proxy's volumes holds (ConfigMap, Secret, emptyDir) under ``root``.

    Mount paths in the args and in the mounted files are rewritten to their directories, so the
    real proxy runs the manifests' config, args, environment and secrets unchanged otherwise.
    """
    by_key = {_key(doc): doc for doc in objects}
    deployment = by_key[("Deployment", MES)]
    container = _container(deployment, PROXY)
    volumes = {volume["name"]: volume for volume in _pod_spec(deployment)["volumes"]}
    mounts: dict[str, Path] = {}
    written: list[Path] = []
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        directory = root / mount["name"]
        directory.mkdir()
        data: Mapping[str, str] = {}
        items: Sequence[Mapping[str, str]] = ()
        if "configMap" in volume:
            data = by_key[("ConfigMap", volume["configMap"]["name"])]["data"]
            items = volume["configMap"].get("items", ())
        elif "secret" in volume:
            data = _secret_data(by_key[("Secret", volume["secret"]["secretName"])])
            items = volume["secret"].get("items", ())
        # emptyDir and persistentVolumeClaim: an empty writable directory.
        paths = {item["key"]: item["path"] for item in items} if items else {key: key for key in data}
        for key, name in paths.items():
            (directory / name).write_text(data[key], encoding="utf-8")
            written.append(directory / name)
        mounts[mount["mountPath"].rstrip("/")] = directory

    def rewrite(text: str) -> str:
        for mount_path in sorted(mounts, key=len, reverse=True):
            text = text.replace(f"{mount_path}/", f"{mounts[mount_path]}/")
        return text

    for file in written:
        file.write_text(rewrite(file.read_text(encoding="utf-8")), encoding="utf-8")
    args = tuple(rewrite(str(arg)) for arg in container["args"])
    env = {
        entry["name"]: (
            str(entry["value"])
            if "value" in entry
            else FIELD_VALUES[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        )
        for entry in container.get("env", ())
    }
    (config_file,) = (Path(arg) for arg in args if arg.endswith(".yaml"))
    return MaterializedPod(args=args, env=env, config_file=config_file)


def _rendered(directory: Path) -> tuple[Doc, ...]:
    """The kustomization rendered by kustomize where a binary is on PATH, else its resources."""
    command = _kustomize_command()
    if command is None:
        return _objects(directory)
    result = subprocess.run(
        (*command, str(directory)), capture_output=True, text=True, timeout=RENDER_TIMEOUT_S, check=True
    )
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def _isolated_network() -> tuple[str, ...]:
    """A command prefix that runs in a new network namespace with only loopback up.

    The manifests bind 0.0.0.0:8080 and 0.0.0.0:9901; in a namespace of its own the proxy binds
    exactly that, reachable from nothing but itself, and takes no port of this machine.
    """
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2) to bind 0.0.0.0 in a private network")
    lo_up = 'ip link set lo up && exec "$0" "$@"'
    prefix = ("unshare", "--user", "--map-root-user", "--net", "sh", "-c", lo_up)
    probe = subprocess.run((*prefix, "true"), capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private network namespace here: {probe.stderr.strip()}")
    return prefix


async def _in_namespace_get(pid: int, url: str, token: str | None) -> int:
    """The status of a GET made from inside the network namespace of process ``pid``."""
    script = (
        "import sys, urllib.request, urllib.error\n"
        "request = urllib.request.Request(sys.argv[1])\n"
        "if len(sys.argv) > 2: request.add_header('Authorization', 'Bearer ' + sys.argv[2])\n"
        "try: print(urllib.request.urlopen(request, timeout=10).status)\n"
        "except urllib.error.HTTPError as error: print(error.code)\n"
    )
    enter = ("nsenter", f"--target={pid}", "--net", "--user", "--preserve-credentials")
    child = await asyncio.create_subprocess_exec(
        *enter, sys.executable, "-c", script, url, *((token,) if token else ()), stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), START_TIMEOUT_S)
    return int(out)


@dataclass(slots=True)
class StartedFromManifests:
    """A proxy started from the manifests: its PID, the ready record and every JSON line."""

    pid: int
    ready: Doc
    records: list[Doc]


async def _spawn_from_manifests(pod: MaterializedPod) -> asyncio.subprocess.Process:
    """The real proxy with the pod's args and environment, in a network of its own."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **pod.env}
    # The build the test run asked for (pure or native), not a stale one beside the sources.
    if "MES_TRACE_PROXY_PURE_PYTHON" in os.environ:
        env["MES_TRACE_PROXY_PURE_PYTHON"] = os.environ["MES_TRACE_PROXY_PURE_PYTHON"]
    return await asyncio.create_subprocess_exec(
        *_isolated_network(),
        sys.executable,
        "-m",
        "mes_trace_proxy",
        *pod.args,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@contextlib.asynccontextmanager
async def _start_from_manifests(pod: MaterializedPod) -> AsyncIterator[StartedFromManifests]:
    """Run the real proxy with the pod's args and environment; stop it by PID with SIGTERM."""
    child = await _spawn_from_manifests(pod)
    assert child.stdout is not None
    lines: list[str] = []

    def records() -> list[Doc]:
        parsed = []
        for line in lines:
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    parsed.append(value)
        return parsed

    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not any(r.get("message") == "mes-trace-proxy ready" for r in records()):
                raw = await child.stdout.readline()
                if not raw:
                    pytest.fail("the proxy exited before it was ready:\n" + "\n".join(lines))
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
        (ready,) = (r for r in records() if r.get("message") == "mes-trace-proxy ready")
        started = StartedFromManifests(pid=child.pid, ready=ready, records=[])
        yield started
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        async with asyncio.timeout(START_TIMEOUT_S):
            rest, _ = await child.communicate()
        lines.extend(rest.decode("utf-8", "replace").splitlines())
    started.records.extend(records())


def _warnings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(r.get("message")) for r in records if r.get("level") in {"warning", "error", "critical"}]


async def test_manifests_start_the_proxy_without_a_warning(tmp_path: Path) -> None:
    """The real proxy, run with the rendered ConfigMap, args and environment and the token Secret
    filled as a deployer fills it, binds 0.0.0.0 as the manifests say and logs no warning from start
    to drain; the admin API wants a token, Prometheus's (the Secret's ``viewer`` key) reads /metrics
    and only the admin token reads /config."""
    objects, tokens = _filled_by_the_deployer(_rendered(BASE))
    pod = _materialize_proxy(objects, tmp_path)
    secret = next(doc for doc in objects if _key(doc) == ("Secret", ADMIN_TOKENS_SECRET))
    viewer = _secret_data(secret)["viewer"]
    async with _start_from_manifests(pod) as proxy:
        assert proxy.ready["admin"] == "0.0.0.0:9901"
        metrics, config = "http://127.0.0.1:9901/metrics", "http://127.0.0.1:9901/config"
        assert await _in_namespace_get(proxy.pid, "http://127.0.0.1:9901/healthz", None) == 200
        assert await _in_namespace_get(proxy.pid, metrics, None) == 401
        assert await _in_namespace_get(proxy.pid, metrics, viewer) == 200
        assert await _in_namespace_get(proxy.pid, config, viewer) == 403
        assert await _in_namespace_get(proxy.pid, config, tokens["admin"]) == 200
    assert _warnings(proxy.records) == []


async def test_the_shipped_placeholder_tokens_stop_start_up(tmp_path: Path) -> None:
    """The manifests applied as shipped, the Secret's public CHANGEME tokens unreplaced: the real
    proxy refuses to start (exit 2, before binding anything), naming the key and the cure."""
    pod = _materialize_proxy(_rendered(BASE), tmp_path)
    child = await _spawn_from_manifests(pod)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            out, _ = await child.communicate()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    output = out.decode("utf-8", "replace")
    tokens_file = yaml.safe_load(pod.config_file.read_text(encoding="utf-8"))["admin"]["tokens_file"]
    assert child.returncode == 2, output
    assert output.strip() == (
        f"mes-trace-proxy: configuration error: admin.tokens_file: {tokens_file}: line 1: the viewer"
        " token is a published placeholder (CHANGEME): generate one with `openssl rand -hex 32`"
    )


def test_token_secret_gives_the_proxy_both_roles_and_prometheus_the_viewer() -> None:
    """The shipped Secret lists a viewer and an admin line and its ``viewer`` key is the viewer line's
    token; filled as its comment says, the real parser gives both roles and the ``viewer`` key reads
    as viewer only; the proxy mounts the file alone."""
    from mes_trace_proxy.core.admin_auth import Role, Verdict, authorize, parse_tokens

    shipped = _secret_data(_base("Secret", ADMIN_TOKENS_SECRET))
    lines = dict(line.partition(":")[::2] for line in shipped["tokens"].splitlines())
    assert sorted(lines) == ["admin", "viewer"]
    assert lines["viewer"] == shipped["viewer"]
    objects, tokens = _filled_by_the_deployer(_objects(BASE))
    data = _secret_data(next(doc for doc in objects if _key(doc) == ("Secret", ADMIN_TOKENS_SECRET)))
    table = parse_tokens(data["tokens"])
    assert authorize(table, f"Bearer {data['viewer']}", Role.VIEWER) is Verdict.ALLOWED
    assert authorize(table, f"Bearer {data['viewer']}", Role.ADMIN) is Verdict.FORBIDDEN
    assert authorize(table, f"Bearer {tokens['admin']}", Role.ADMIN) is Verdict.ALLOWED
    (volume,) = (v for v in _pod_spec(_base("Deployment", MES))["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == ADMIN_TOKENS_SECRET
    assert [item["key"] for item in volume["secret"]["items"]] == ["tokens"]


def test_pod_monitor_scrapes_the_admin_port_with_the_viewer_token() -> None:
    """The PodMonitor selects the MES pod, scrapes the proxy's admin port and sends the Secret's
    viewer token (the Operator reads the Secret from the monitor's namespace: the same kustomization)."""
    objects = _objects(OVERLAYS / "prometheus-operator")
    (monitor,) = (doc for doc in objects if doc["kind"] == "PodMonitor")
    deployment = next(doc for doc in objects if _key(doc) == ("Deployment", MES))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert _port_of(_container(deployment, PROXY), endpoint["port"]) == 9901
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    secret = next(doc for doc in objects if _key(doc) == ("Secret", credentials["name"]))
    assert credentials["key"] == "viewer"
    assert credentials["key"] in _secret_data(secret)


def test_the_shipped_placeholder_tokens_are_refused_and_the_recipe_is_given() -> None:
    """Every token the shipped Secret holds is a public placeholder the real parser refuses, and the
    Secret's comment and docs/deployment.md give the ``openssl rand -hex 32`` recipe that replaces them."""
    from mes_trace_proxy.core.admin_auth import TokenError, parse_tokens

    shipped = _secret_data(_base("Secret", ADMIN_TOKENS_SECRET))
    for line in shipped["tokens"].splitlines():
        with pytest.raises(TokenError, match=r"published placeholder \(CHANGEME\)"):
            parse_tokens(line)
    recipe = "openssl rand -hex 32"
    assert recipe in (BASE / "mes-trace-proxy-admin-tokens.yaml").read_text(encoding="utf-8")
    assert recipe in (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")


async def test_without_the_token_file_the_manifests_would_warn(tmp_path: Path) -> None:
    """The control: the same pod without admin.tokens_file logs the exposure warning, so the test
    above can tell a quiet start from a deaf one."""
    pod = _materialize_proxy(_rendered(BASE), tmp_path)
    config = yaml.safe_load(pod.config_file.read_text(encoding="utf-8"))
    del config["admin"]["tokens_file"]
    pod.config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    async with _start_from_manifests(pod) as proxy:
        assert proxy.ready["admin"] == "0.0.0.0:9901"
    assert len([m for m in _warnings(proxy.records) if m.startswith(EXPOSURE_WARNING)]) == 1


DOWNWARD_API: Final = (
    ("K8S_POD_NAME", "metadata.name"),
    ("K8S_NAMESPACE_NAME", "metadata.namespace"),
    ("K8S_NODE_NAME", "spec.nodeName"),
)


@pytest.mark.parametrize(("variable", "field"), DOWNWARD_API, ids=[v for v, _ in DOWNWARD_API])
def test_downward_api_variables(variable: str, field: str) -> None:
    """The proxy gets its pod, namespace and node names from the downward API."""
    env = {e["name"]: e for e in _container(_base("Deployment", MES), PROXY)["env"]}
    assert env[variable]["valueFrom"]["fieldRef"]["fieldPath"] == field


PROBES: Final = (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"))


@pytest.mark.parametrize(("probe", "path"), PROBES, ids=[p for p, _ in PROBES])
def test_probes_hit_the_admin_listener(probe: str, path: str) -> None:
    """Liveness asks /healthz and readiness /readyz, both on the admin port 9901."""
    proxy = _container(_base("Deployment", MES), PROXY)
    http_get = proxy[probe]["httpGet"]
    assert (http_get["path"], _port_of(proxy, http_get["port"])) == (path, 9901)


def test_state_and_config_volumes() -> None:
    """The state dir is an emptyDir or PVC; the config is the ConfigMap, mounted read-only."""
    deployment = _base("Deployment", MES)
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(deployment, PROXY)["volumeMounts"]}
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[mounts[STATE_DIR]["name"]])
    config_mount = mounts["/etc/mes-trace-proxy"]
    assert config_mount["readOnly"] is True
    assert volumes[config_mount["name"]]["configMap"]["name"] == PROXY_CONFIG_MAP


@pytest.mark.parametrize("container", tuple(_containers(_objects(BASE))), ids=lambda c: c["name"])
def test_containers_have_requests_and_limits(container: Doc) -> None:
    """Every base container declares CPU and memory requests and a memory limit."""
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_network_policy_opens_only_proxy_ports_on_mes_pods() -> None:
    """Policies selecting the MES pod admit 8080 and 9901 only, never MES's 8081."""
    policies = [
        doc
        for doc in _objects(BASE)
        if doc["kind"] == "NetworkPolicy"
        and doc["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": MES}
    ]
    ingress_ports = {
        p["port"] for doc in policies for rule in doc["spec"].get("ingress", ()) for p in rule["ports"]
    }
    egress_ports = {
        p["port"] for doc in policies for rule in doc["spec"].get("egress", ()) for p in rule["ports"]
    }
    assert ingress_ports == {8080, 9901}
    assert 4317 in egress_ports


def test_jaeger_retention_is_bounded() -> None:
    """Every bundled Jaeger storage backend is a memory store with max_traces or badger with a TTL."""
    config = yaml.safe_load(_base("ConfigMap", "jaeger-config")["data"]["config.yaml"])
    backends = config["extensions"]["jaeger_storage"]["backends"].values()
    assert backends
    for backend in backends:
        bounded = backend.get("memory", {}).get("max_traces", 0) > 0 or "spans" in backend.get(
            "badger", {}
        ).get("ttl", {})
        assert bounded, backend


def test_jaeger_service_is_cluster_internal() -> None:
    """The Jaeger Service is ClusterIP and carries OTLP gRPC, OTLP HTTP and the UI."""
    service = _base("Service", "jaeger")
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["port"] for p in service["spec"]["ports"]} == {4317, 4318, 16686}


def _k8s_env_names() -> set[str]:
    docs = [doc for d in _kustomization_dirs() for doc in (*_objects(d), *_patch_docs(_kustomization(d)))]
    return {e["name"] for c in _containers(docs) if c["name"] in OUR_CONTAINERS for e in c.get("env", ())}


def _compose_env_names() -> set[str]:
    services = _load_one(COMPOSE)["services"].values()
    return {name for service in services if "build" in service for name in service.get("environment", {})}


ENV_SOURCES: Final = (("k8s", _k8s_env_names), ("compose", _compose_env_names))


@pytest.mark.parametrize("names", [s[1] for s in ENV_SOURCES], ids=[s[0] for s in ENV_SOURCES])
def test_env_names_are_documented(names: Callable[[], set[str]]) -> None:
    """Every variable our containers get is one docs/configuration.md lists."""
    documented, prefixes = _documented_env()
    used = names()
    assert used
    assert {n for n in used if n not in documented and not n.startswith(tuple(prefixes))} == set()


def _our_commands() -> Iterator[tuple[str, list[str]]]:
    """(id, argv) of every command our image runs in compose.yaml and the k8s manifests."""
    for name, service in _load_one(COMPOSE)["services"].items():
        if "build" in service:
            yield f"compose:{name}", [str(arg) for arg in service["command"]]
    seen: set[tuple[str, ...]] = set()
    for directory in _kustomization_dirs():
        # An overlay repeats its base's objects; each distinct command is checked once.
        docs = (*_objects(directory), *_patch_docs(_kustomization(directory)))
        for container in _containers(docs):
            # MES's container runs our image only where an overlay gives it our arguments;
            # a patch that only adds variables to our container has no command to check.
            ours = container["name"] in OUR_CONTAINERS | {MES} and "args" in container
            argv = tuple(str(arg) for arg in container.get("args", ()))
            if ours and argv not in seen:
                seen.add(argv)
                yield f"{_rel(directory)}:{container['name']}", list(argv)


COMMANDS: Final = tuple(_our_commands())


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_commands_parse_with_the_real_cli(argv: list[str]) -> None:
    """Every command our image runs in compose and k8s is accepted by the real argument parser."""
    from mes_trace_proxy.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        reason = f"{argv} rejected (exit {exit_.code})"
    else:
        return
    pytest.fail(reason)


def test_compose_proxy_environment_loads() -> None:
    """The compose proxy's MES_PROXY_* variables and command form a valid config."""
    from mes_trace_proxy.cli import build_parser, load_from_args

    proxy = _load_one(COMPOSE)["services"]["proxy"]
    environ = {name: str(value) for name, value in proxy["environment"].items()}
    config = load_from_args(build_parser().parse_args(proxy["command"]), environ)
    assert len(config.listeners) == 2


# ── compose ─────────────────────────────────────────────────────────────────────────────────


def test_compose_publishes_on_loopback_only() -> None:
    """Every published compose port is bound to 127.0.0.1."""
    services = _load_one(COMPOSE)["services"]
    ports = [str(p) for s in services.values() for p in s.get("ports", ())]
    assert ports
    assert [p for p in ports if not p.startswith("127.0.0.1:")] == []


def test_compose_wiring() -> None:
    """depends_on names real services, Jaeger is v2, and the proxy outlives its 20s drain on stop."""
    services = _load_one(COMPOSE)["services"]
    assert {dep for s in services.values() for dep in s.get("depends_on", {})} <= set(services)
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    proxy = services["proxy"]
    assert _seconds(proxy["stop_grace_period"]) > 20
    assert proxy["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert all(s["read_only"] is True for s in services.values() if "build" in s)


# ── Dockerfile ──────────────────────────────────────────────────────────────────────────────


def _runtime() -> tuple[Instruction, ...]:
    return _dockerfile_stages()[-1]


DOCKERFILE_CHECKS: Final[Sequence[tuple[str, Callable[[], bool]]]] = (
    ("multi-stage-python-3.11-slim", lambda: _resolved_from_images() == ("python:3.11-slim",) * 2),
    (
        "builder-venv-pip-constraints",
        lambda: any(
            a.startswith(f"{BUILD_PIP} --python /opt/venv/bin/python install -c {CONSTRAINTS} /wheels/")
            for a in _args(_dockerfile_stages()[1], "RUN")
        ),
    ),
    # pip and setuptools serve nothing at run time: the runtime venv is made without them.
    (
        "runtime-venv-without-pip",
        lambda: any(
            "python -m venv --without-pip /opt/venv" in a for a in _args(_dockerfile_stages()[1], "RUN")
        ),
    ),
    # Run in WORKDIR /src, `python -c` imports the source tree, not the installed wheel.
    (
        "native-check-imports-the-installed-wheel",
        lambda: any(
            "cd / && /opt/venv/bin/python -I -c" in a and "native.current()" in a
            for a in _args(_dockerfile_stages()[1], "RUN")
        ),
    ),
    (
        "builder-compiles-the-native-build",
        lambda: any("pip wheel --no-build-isolation" in a for a in _args(_dockerfile_stages()[1], "RUN")),
    ),
    (
        "runtime-copies-only-venv",
        lambda: _args(_runtime(), "COPY") == ("--from=builder /opt/venv /opt/venv",),
    ),
    ("non-root-user", lambda: _args(_runtime(), "USER") == (f"{PROXY_UID}:{PROXY_UID}",)),
    ("no-bytecode-writes", lambda: _env(_runtime()).get("PYTHONDONTWRITEBYTECODE") == "1"),
    ("state-volume", lambda: _args(_runtime(), "VOLUME") == (json.dumps([STATE_DIR]),)),
    (
        "exposes-proxy-ports",
        lambda: {int(p) for a in _args(_runtime(), "EXPOSE") for p in a.split()} == PROXY_PORTS,
    ),
    ("entrypoint-exec-form", lambda: [_exec_form(a) for a in _args(_runtime(), "ENTRYPOINT")] == [[PROXY]]),
    ("cmd-serve", lambda: [_exec_form(a) for a in _args(_runtime(), "CMD")] == [["serve"]]),
    ("oci-labels", lambda: "org.opencontainers.image.title=" in " ".join(_args(_runtime(), "LABEL"))),
)


@pytest.mark.parametrize("check", [c[1] for c in DOCKERFILE_CHECKS], ids=[c[0] for c in DOCKERFILE_CHECKS])
def test_dockerfile(check: Callable[[], bool]) -> None:
    """The Dockerfile keeps the property its id names."""
    assert check()


def test_dockerfile_healthcheck_is_exec_form_urllib() -> None:
    """HEALTHCHECK runs python's urllib against /healthz in exec form (no shell, no curl)."""
    (healthcheck,) = _args(_runtime(), "HEALTHCHECK")
    command = _exec_form(healthcheck.partition(" CMD ")[2])
    assert command is not None
    assert command[:2] == ["python", "-c"]
    assert "urllib" in command[2]
    assert "/healthz" in command[2]


DOCKERIGNORED: Final = (
    ".venv",
    ".git",
    "**/__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    "demo-output",
    "bench/results",
    "**/*.so",
)


@pytest.mark.parametrize("pattern", DOCKERIGNORED)
def test_dockerignore_excludes(pattern: str) -> None:
    """.dockerignore keeps local state and caches out of the build context."""
    assert pattern in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
