"""Helpers of the ``wikitext_local`` task: read WikiText-2 from disk and split it into articles.

WikiText-2 (the tokenized ``wiki.*.tokens`` or the ``wiki.*.raw`` release) is one line per
paragraph, with ``" = Title = "`` lines opening articles and ``" = = Section = = "`` lines
opening sections. An article is its title line and every line up to the next title, joined by
newlines, the layout of the ``page`` field of ``EleutherAI/wikitext_document_level`` that
lm-eval's own ``wikitext`` task reads. Detokenization and the word/byte counts are lm-eval's own
(imported, not copied), so the metrics match the built-in task's definitions.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

WIKITEXT_ENV = "ATTAMBA_WIKITEXT_PATH"
_SPLIT_FILES = {"test": "wiki.test", "validation": "wiki.valid", "train": "wiki.train"}

_lm_eval_wikitext = importlib.import_module("lm_eval.tasks.wikitext.preprocess_wikitext")
wikitext_detokenizer = _lm_eval_wikitext.wikitext_detokenizer
process_results = _lm_eval_wikitext.process_results


def is_title(line: str) -> bool:
    """True for an article title line ``" = Title = "``, false for ``" = = Section = = "``."""
    stripped = line.strip()
    return stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")


def split_articles(text: str) -> list[str]:
    """The articles of a WikiText file's text; text before the first title is dropped if blank."""
    articles, lines = [], []
    for line in text.split("\n"):
        if is_title(line) and lines:
            articles.append("\n".join(lines))
            lines = []
        lines.append(line)
    articles.append("\n".join(lines))
    return [article for article in articles if article.strip()]


def resolve_split_files(path: Path) -> dict[str, Path]:
    """Split name -> file: a file is the ``test`` split; a directory offers each ``wiki.<split>``."""
    if path.is_file():
        return {"test": path}
    found = {}
    for split, stem in _SPLIT_FILES.items():
        for suffix in (".tokens", ".raw"):
            if (path / (stem + suffix)).is_file():
                found[split] = path / (stem + suffix)
                break
    if "test" not in found:
        raise FileNotFoundError(f"WikiText directory {path} holds neither wiki.test.tokens nor wiki.test.raw")
    return found


def find_wikitext(configured: Optional[str]) -> Path:
    """The configured path, else $ATTAMBA_WIKITEXT_PATH; an error names both when neither exists."""
    raw = configured or os.environ.get(WIKITEXT_ENV)
    if not raw:
        raise FileNotFoundError(
            f"wikitext_local needs WikiText-2: set eval.wikitext_path (task metadata 'wikitext_path') "
            f"or the environment variable {WIKITEXT_ENV} to wiki.test.tokens or its directory"
        )
    path = Path(raw).expanduser()
    if not path.exists():
        source = "eval.wikitext_path" if configured else f"${WIKITEXT_ENV}"
        raise FileNotFoundError(
            f"WikiText-2 file not found: {path} (from {source}); point eval.wikitext_path or "
            f"{WIKITEXT_ENV} at wiki.test.tokens (or wiki.test.raw) or the folder holding it"
        )
    return path


def load_wikitext(wikitext_path: Optional[str] = None, **_task_metadata: Any):
    """lm-eval ``custom_dataset`` hook: a DatasetDict of ``{"page": article}`` rows per split.

    lm-eval calls it with the task's metadata as keyword arguments (``version`` and whatever
    the TaskManager was given); only ``wikitext_path`` matters here.
    """
    import datasets

    files = resolve_split_files(find_wikitext(wikitext_path))
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict({"page": split_articles(file.read_text(encoding="utf-8"))}) for split, file in files.items()}
    )
