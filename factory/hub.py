"""``factory push``: a dataset version to the Hugging Face Hub, as a commit and a tag.

The commit puts the parquet shards under ``data/`` (``<config>/`` for a named config),
the dataset card as ``README.md`` (YAML metadata: configs, license, task categories, size
category, tags, and the recipe that made the data) and ``manifest.json``; shards of an
older version that the new one does not have are deleted, so ``main`` holds the latest
version. The commit is then tagged ``v<N>`` (``<config>-v<N>`` for a named config), so
``load_dataset(repo, revision="v3")`` gets exactly version 3.

People's verdicts on the version's rows (``factory view``) travel as a separate file,
``annotations/v<N>.jsonl`` (``<config>/annotations/v<N>.jsonl`` for a named config), never in
the shards; the card says where they are and how many. Verdict files of older versions
leave ``main`` with their shards (their tags keep them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FactoryError

DEFAULT_CONFIG = "default"


@dataclass
class PushPlan:
    """What a push would do: the files it adds, the files it deletes, the tag."""

    repo: str
    config_name: str
    adds: list[tuple[str, Path | bytes]]
    deletes: list[str] = field(default_factory=list)
    tag: str = ""
    commit_message: str = ""

    def describe(self) -> str:
        lines = [f"push to https://huggingface.co/datasets/{self.repo} (config '{self.config_name}')",
                 f"commit: {self.commit_message}"]
        for path, source in self.adds:
            size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
            lines.append(f"  add     {path}  ({size:,} bytes)")
        for path in self.deletes:
            lines.append(f"  delete  {path}")
        lines.append(f"tag: {self.tag}")
        return "\n".join(lines)


def _prefix(config_name: str) -> str:
    return "data" if config_name == DEFAULT_CONFIG else config_name


def annotations_file(config_name: str, version: int) -> str:
    """Where a version's verdicts go in the repo: beside its config's files, as the shards and manifest."""
    folder = "annotations" if config_name == DEFAULT_CONFIG else f"{config_name}/annotations"
    return f"{folder}/v{version}.jsonl"


def hub_card(version_dir: Path, repo: str, config_name: str, existing_card: str | None = None,
             verdicts: dict | None = None) -> str:
    """The version's card, pointing at the Hub, listing every config the repo will hold.

    Args:
        verdicts: the standing verdicts to mention (read from the version's annotations when None).
    """
    from huggingface_hub import DatasetCard

    from .annotations import read_verdicts
    from .store import dataset_card, read_manifest, read_version

    manifest = read_manifest(version_dir)
    tag = tag_for(manifest["version"], config_name)
    configs = [{"config_name": config_name, "data_files": [{"split": "train", "path": f"{_prefix(config_name)}/train-*"}],
                **({"default": True} if config_name == DEFAULT_CONFIG else {})}]
    if existing_card:
        for other in DatasetCard(existing_card).data.to_dict().get("configs") or []:
            if other.get("config_name") != config_name:
                configs.append(other)
    load = (f'load_dataset("{repo}"' + (f', "{config_name}"' if config_name != DEFAULT_CONFIG else "") +
            f', revision="{tag}", split="train")')
    card = dataset_card({**manifest, "path": None}, read_version(version_dir), configs=configs, load_code=load)
    verdicts = read_verdicts(version_dir) if verdicts is None else verdicts
    return _with_verdicts_line(card, verdicts, annotations_file(config_name, manifest["version"])) if verdicts \
        else card


def _with_verdicts_line(card: str, verdicts: dict, path: str) -> str:
    """The card with one line on people's verdicts, under its line on the rows."""
    from .annotations import verdict_counts

    on_data = sum(part == "data" for part, _ in verdicts)
    counts = verdict_counts(verdicts)
    line = (f"- People's verdicts: {counts['count']} rows labelled ({counts['good']} good, {counts['bad']} bad) in "
            f"`{path}` ({on_data} on rows of the train split, by `index`; {len(verdicts) - on_data} on dropped "
            "rows, which are not pushed)")
    lines = card.split("\n")
    at = next((i for i, text in enumerate(lines) if text.startswith("- Rows: ")), len(lines) - 1)
    return "\n".join(lines[:at + 1] + [line] + lines[at + 1:])


def tag_for(version: int, config_name: str) -> str:
    return f"v{version}" if config_name == DEFAULT_CONFIG else f"{config_name}-v{version}"


def plan_push(version_dir: str | Path, repo: str, config_name: str = DEFAULT_CONFIG,
              existing_files: list[str] | None = None, existing_card: str | None = None) -> PushPlan:
    """The commit operations of a push (computed offline when ``existing_files`` is None)."""
    from .annotations import read_verdicts, verdicts_jsonl
    from .store import MANIFEST, read_manifest

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise FactoryError(f"'{repo}' is not a repo id; write ORG/NAME, e.g. my-org/my-dataset")
    if not re.fullmatch(r"[\w.-]+", config_name):
        raise FactoryError(f"'{config_name}' is not a usable config name; use letters, digits, '.', '_' and '-'")
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    prefix = _prefix(config_name)
    adds: list[tuple[str, Path | bytes]] = [(f"{prefix}/{Path(f).name}", version_dir / f)
                                            for f in manifest["files"]["data"]]
    manifest_path = MANIFEST if config_name == DEFAULT_CONFIG else f"{prefix}/{MANIFEST}"
    adds.append((manifest_path, version_dir / MANIFEST))
    verdicts = read_verdicts(version_dir)
    annotations = annotations_file(config_name, manifest["version"])
    if verdicts:
        adds.append((annotations, verdicts_jsonl(verdicts).encode("utf-8")))
    # The card goes last: push() validates plan.adds[-1] as the card.
    adds.append(("README.md", hub_card(version_dir, repo, config_name, existing_card, verdicts).encode("utf-8")))
    new = {path for path, _ in adds}
    annotations_folder = annotations.rsplit("/", 1)[0] + "/"
    deletes = sorted(f for f in existing_files or [] if f not in new and (
        (f.startswith(prefix + "/") and f.endswith(".parquet")) or
        # An older version's verdicts describe rows main no longer holds.
        (f.startswith(annotations_folder) and re.fullmatch(r"v\d+\.jsonl", f[len(annotations_folder):]))))
    return PushPlan(repo, config_name, adds, deletes, tag_for(manifest["version"], config_name),
                    f"{manifest['name']} v{manifest['version']} (recipe {str(manifest.get('recipe_hash'))[:12]})")


def validate_card_offline(card_text: str) -> dict:
    """Parses a card as huggingface_hub does and checks its metadata against the Hub's value sets.

    The Hub's own validator (``DatasetCard.validate``) needs the network; this catches what
    can be caught without it: unreadable YAML, unknown size categories, malformed configs.

    Raises:
        FactoryError: naming the problem.
    """
    from huggingface_hub import DatasetCard

    try:
        card = DatasetCard(card_text)
    except Exception as err:  # huggingface_hub raises ValueError for bad front matter
        raise FactoryError(f"the dataset card does not parse: {err}") from None
    data = card.data.to_dict()
    sizes = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B", "1B<n<10B",
             "10B<n<100B", "100B<n<1T", "n>1T"}
    for size in data.get("size_categories") or []:
        if size not in sizes:
            raise FactoryError(f"size category '{size}' is not one of the Hub's: {', '.join(sorted(sizes))}")
    for config in data.get("configs") or []:
        if not isinstance(config.get("config_name"), str) or not config.get("data_files"):
            raise FactoryError(f"config {config} needs a config_name and data_files")
        for files in config["data_files"]:
            if not {"split", "path"} <= set(files):
                raise FactoryError(f"data_files entry {files} needs a split and a path")
    if not isinstance(data.get("license"), (str, list)):
        raise FactoryError("the card has no license")
    return data


def push(version_dir: str | Path, repo: str, *, private: bool = False, config_name: str = DEFAULT_CONFIG,
         dry_run: bool = False, force: bool = False, token: str | None = None, api=None) -> PushPlan:
    """Pushes a version (or, with ``dry_run``, only says what it would push)."""
    from huggingface_hub import HfApi, get_token

    from .store import read_manifest

    if dry_run:
        plan = plan_push(version_dir, repo, config_name)
        validate_card_offline(plan.adds[-1][1].decode("utf-8"))
        return plan
    token = token or get_token()
    if not token and api is None:
        raise FactoryError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run to see "
                           "what would be pushed)")
    api = api or HfApi(token=token)
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    existing = api.list_repo_files(repo, repo_type="dataset")
    version = read_manifest(version_dir)["version"]
    pattern = re.compile(r"^v(\d+)$" if config_name == DEFAULT_CONFIG else rf"^{re.escape(config_name)}-v(\d+)$")
    newer = [t.name for t in api.list_repo_refs(repo, repo_type="dataset").tags
             if pattern.match(t.name) and int(pattern.match(t.name).group(1)) >= version]
    if newer and not force:
        raise FactoryError(f"{repo} already has {', '.join(sorted(newer))}; pushing v{version} would make main "
                           "hold an older version. Push a newer version, or pass --force")
    existing_card = None
    if "README.md" in existing and config_name != DEFAULT_CONFIG:
        existing_card = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset")).read_text(encoding="utf-8")
    plan = plan_push(version_dir, repo, config_name, existing, existing_card)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard

    DatasetCard(plan.adds[-1][1].decode("utf-8")).validate(repo_type="dataset")
    operations = [CommitOperationAdd(path, source if isinstance(source, bytes) else str(source))
                  for path, source in plan.adds]
    operations += [CommitOperationDelete(path) for path in plan.deletes]
    commit = api.create_commit(repo, operations, commit_message=plan.commit_message, repo_type="dataset")
    api.create_tag(repo, tag=plan.tag, revision=commit.oid, repo_type="dataset", exist_ok=force)
    return plan

