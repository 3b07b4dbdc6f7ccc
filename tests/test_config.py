"""Configuration: the shipped serve_config.yaml validates; wrong keys and values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app import serve_env
from app.config import REPO_ROOT, AppConfig, parse_app_config
from app.specs import EngineSpec
from deployments.options import serve_options


def _shipped_args(name: str = "serve_config.yaml") -> dict:
    return yaml.safe_load((REPO_ROOT / name).read_text())["applications"][0]["args"]


def test_shipped_config_validates_and_points_at_the_bundled_model():
    config = parse_app_config(_shipped_args())
    assert Path(config.model.path).is_dir()
    assert (Path(config.model.path) / "model.safetensors").exists()
    spec = EngineSpec.from_config(config)
    assert spec.dtype == "float32" and spec.block_size % 32 == 0


def test_unknown_key_is_named_with_the_fix():
    with pytest.raises(ValueError) as info:
        parse_app_config({"engine": {"blok_size": 32}})
    assert "engine.blok_size" in str(info.value) and "unknown key" in str(info.value)


@pytest.mark.parametrize(("args", "key"), [
    ({"mode": "split"}, "mode"),
    ({"engine": {"block_size": 20}}, "engine.block_size"),
    ({"model": {"dtype": "int3"}}, "model.dtype"),
    ({"prefill": {"min_replicas": 3, "max_replicas": 2}}, "prefill"),
    ({"decode": {"num_replicas": 0}}, "decode.num_replicas"),
    ({"kv_transfer": {"backend": "mpi"}}, "kv_transfer.backend"),
])
def test_bad_values_fail_naming_the_key(args, key):
    with pytest.raises(ValueError) as info:
        parse_app_config(args)
    assert key in str(info.value)


def test_deployment_options_map_to_serve_options():
    fixed = serve_options(AppConfig().collocated)
    assert fixed["num_replicas"] == 1 and fixed["ray_actor_options"]["num_cpus"] == 1.0
    auto = serve_options(parse_app_config({"decode": {"num_replicas": "auto", "min_replicas": 1, "max_replicas": 4,
                                                      "num_gpus": 1}}).decode)
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto
    assert auto["ray_actor_options"]["num_gpus"] == 1
    assert "resources" not in auto["ray_actor_options"]  # none asked for: Serve's default placement
    placed = serve_options(parse_app_config({"prefill": {"resources": {"prefill_node": 0.01}}}).prefill)
    assert placed["ray_actor_options"]["resources"] == {"prefill_node": 0.01}


def test_relative_model_path_resolves_against_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_app_config({"model": {"path": "models/pdserve-tiny-llama"}})
    assert Path(config.model.path).is_absolute() and Path(config.model.path).is_dir()
    assert parse_app_config({"model": {"path": "org/hub-model"}}).model.path == "org/hub-model"


def test_gpu_example_config_validates_with_nccl_and_one_gpu_per_engine():
    config = parse_app_config(_shipped_args("examples/serve_config.gpu.yaml"))
    assert config.mode == "disaggregated" and config.kv_transfer.backend == "nccl"
    assert config.prefill.num_gpus == 1 and config.decode.num_gpus == 1
    assert serve_options(config.decode)["autoscaling_config"]["max_replicas"] == 6
    assert config.auth.enabled  # the documented production config requires keys


def test_gpu_example_validates_as_a_serve_config_with_the_joint_policy():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from app.autoscaling import PDJointPolicy

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "examples" / "serve_config.gpu.yaml").read_text())
    (application,) = ServeDeploySchema.model_validate(raw).applications
    policy = application.autoscaling_policy
    assert policy["policy_function"] == "app.autoscaling:PDJointPolicy"
    joint = PDJointPolicy(**policy["policy_kwargs"])
    assert joint.min_ratio < joint.max_ratio
    config = parse_app_config(application.args)
    assert config.prefill.num_replicas == "auto" and config.warmup.interval_s == 30


@pytest.mark.parametrize("manifest", ["rayservice.cpu.yaml", "rayservice.gpu.yaml"])
def test_kuberay_manifests_carry_a_valid_app_whose_phases_land_on_their_own_worker_groups(manifest):
    import json

    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "examples" / "kuberay" / manifest).read_text())
    assert raw["kind"] == "RayService"
    (application,) = ServeDeploySchema.model_validate(yaml.safe_load(raw["spec"]["serveConfigV2"])).applications
    config = parse_app_config(application.args)
    # KubeRay passes rayStartParams.resources to `ray start --resources` as a quoted JSON string
    offered = {group["groupName"]: json.loads(json.loads(group["rayStartParams"]["resources"]))
               for group in raw["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for phase in ("prefill", "decode"):
        wanted = serve_options(getattr(config, phase))["ray_actor_options"]["resources"]
        assert [group for group, has in offered.items() if set(wanted) <= set(has)] == [phase]
    # every node runs a Serve HTTP proxy (and replicas) with pdserve's Serve settings (app/serve_env.py)
    cluster = raw["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert serve_env.SERVE_ENV.items() <= env.items(), container["name"]
