import pytest
import yaml

from synthalign_ray.base import is_hub_id, pretrained_source, split_revision
from synthalign_ray.config import ConfigError, load_config, parse_override
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"


def test_tiny_config_validates_and_resolves_prompt_path_next_to_it():
    cfg = load_config(TINY)
    assert cfg.images.guidance_scales == [5.0, 7.0, 9.0, 11.0]
    assert cfg.prompts.path == str(REPO / "configs" / "prompts" / "tiny.jsonl")


def test_overrides_are_yaml_values():
    cfg = load_config(TINY, ["images.guidance_scales=[5, 7]", "images.steps=2", "image_scores.clip=null"])
    assert cfg.images.guidance_scales == [5.0, 7.0]
    assert cfg.images.steps == 2
    assert cfg.image_scores.clip is None
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("images.guidanse_scales=[5]", "tiny.yaml: images.guidanse_scales: unknown key"),
        ("images.guidance_scales=[1, 7]", "images.guidance_scales: guidance scales must be > 1"),
        ("images.guidance_scales=[7, 7]", "images.guidance_scales: guidance scales must be distinct"),
        ("images.steps=zero", "images.steps: Input should be a valid integer"),
        ("images.model=./missing/model", "images.model: model path './missing/model' does not exist"),
        ("images.model=zoo:nope", "images.model: unknown zoo model 'nope'"),
        ("images.model=zoo:diffusion@v1", "images.model: zoo model 'zoo:diffusion@v1': a zoo model takes no @REVISION"),
        ("images.model=./missing/model@v1", "images.model: model path './missing/model@v1' does not exist (a local folder takes no @REVISION"),
        ("response_scores.model=org/name@", "response_scores.model: hub model 'org/name@': nothing after @"),
        ("response_scores.model=org/name@a b", "response_scores.model: hub model 'org/name@a b': 'a b' is not a revision"),
        ("image_scores.pool.min_actors=3", "image_scores.pool: min_actors (3) > max_actors (1)"),
        ("image_scores.select_by=clip", None),
        ("prompts.path=/no/such/file.jsonl", "prompts.path: input file '/no/such/file.jsonl' does not exist"),
        ("images.steps", "expected KEY=VALUE"),
        ("seed.x=1", "seed is not a section"),
        ("resources.env={HF_TOKEN: hf_abc}", "resources.env: HF_TOKEN looks like a secret: values in resources.env are written to the manifest"),
        ("resources.env={AWS_SECRET_ACCESS_KEY: x, db_password: y, A: b}", "AWS_SECRET_ACCESS_KEY, db_password look like secrets"),
        ("resources.env={HF_HUB_OFFLINE: '1'}", None),
    ],
)
def test_errors_name_the_file_and_field(override, expected):
    if expected is None:  # a valid override for contrast
        load_config(TINY, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert expected in str(err.value)


def test_selector_must_be_scored():
    with pytest.raises(ConfigError, match="select_by='clip' needs image_scores.clip"):
        load_config(TINY, ["image_scores.clip=null", "image_scores.select_by=clip"])


def test_hub_id_must_be_cached_when_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        load_config(TINY, ["images.model=stabilityai/stable-diffusion-3-medium-diffusers"])


@pytest.mark.parametrize(
    "ref, repo_id, revision, hub",
    [
        ("org/name", "org/name", None, True),
        ("gpt2", "gpt2", None, True),
        ("org/name@v1.0", "org/name", "v1.0", True),
        ("org/name@main", "org/name", "main", True),
        ("org/name@" + "0a" * 20, "org/name", "0a" * 20, True),
        ("org/name@refs/pr/1", "org/name", "refs/pr/1", True),  # a pull request's ref, as HfFileSystem paths write it
        ("org/name@", "org/name", "", False),  # nothing pinned
        ("org/name@a@b", "org/name", "a@b", False),
        ("org/name@/main", "org/name", "/main", False),
        ("zoo:diffusion@v1", "zoo:diffusion@v1", None, False),  # zoo names and paths take no revision
        ("./model@v1", "./model@v1", None, False),
        ("/models/x@v1", "/models/x@v1", None, False),
    ],
)
def test_split_revision_and_is_hub_id(ref, repo_id, revision, hub):
    assert split_revision(ref) == (repo_id, revision)
    assert is_hub_id(ref) is hub


def test_a_pinned_hub_id_validates_and_a_local_folder_takes_no_revision(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = load_config(TINY, ["response_scores.model=org/name@refs/pr/1", "images.model=org/diffusion@" + "0a" * 20])
    assert cfg.response_scores.model == "org/name@refs/pr/1"  # kept whole: the manifest says what made the data
    assert pretrained_source(cfg.response_scores.model) == ("org/name", {"revision": "refs/pr/1"})
    assert pretrained_source("org/name") == ("org/name", {})
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # `models/mine` is a local folder here, so `models/mine@v1` is no hub id
    assert not is_hub_id("models/mine@v1")
    with pytest.raises(ConfigError, match=r"images.model: model path 'models/mine@v1' does not exist \(a local folder takes no @REVISION"):
        load_config(TINY, ["images.model=models/mine@v1"])
    assert pretrained_source(str(tmp_path / "models" / "mine")) == (str(tmp_path / "models" / "mine"), {})


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    missing_section = tmp_path / "partial.yaml"
    missing_section.write_text(yaml.safe_dump({"seed": 1}))
    with pytest.raises(ConfigError) as err:
        load_config(missing_section)
    assert "partial.yaml: prompts: required, but missing" in str(err.value)


def test_paper_config_names_the_papers_settings(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert cfg.images.guidance_scales == [5.0, 7.0, 9.0, 11.0]
    assert cfg.images.steps == 28
    assert cfg.image_scores.model == "THUDM/ImageReward"
    assert cfg.image_scores.select_by == "image_reward"


def test_fingerprint_ignores_where_and_how_a_run_goes_but_not_what_it_makes():
    from synthalign_ray.pipeline import config_fingerprint

    base = config_fingerprint(load_config(TINY))
    same = [
        "resources.num_cpus=4",
        "prompts.limit=2",
        "images.pool.max_actors=3",
        "response_scores.pool.batch_size=8",
        "report={license: cc-by-4.0}",
    ]
    for override in same:
        assert config_fingerprint(load_config(TINY, [override])) == base, override
    for override in ["images.steps=3", "pairs.rank_by=reward", "images.guidance_scales=[5,7]"]:
        changed = config_fingerprint(load_config(TINY, [override])) != base
        assert changed == (override != "pairs.rank_by=reward"), override  # rank_by=reward is the default


def test_secret_env_names_must_be_set_in_the_drivers_environment(monkeypatch):
    monkeypatch.delenv("SYNTHALIGN_TEST_SECRET", raising=False)
    cfg = load_config(TINY, ["resources.secret_env=[SYNTHALIGN_TEST_SECRET, HOME]"])
    with pytest.raises(ConfigError, match=r"^resources.secret_env: SYNTHALIGN_TEST_SECRET not set in the driver's environment$"):
        cfg.resources.check_secret_environment()
    monkeypatch.setenv("SYNTHALIGN_TEST_SECRET", "s3cr3t")
    cfg.resources.check_secret_environment()
    assert "s3cr3t" not in str(cfg.model_dump(mode="json"))  # only the name is in the config (and the manifest)
