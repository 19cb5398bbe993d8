"""Every ```python block of README.md and docs/*.md runs, at a small size, so that the examples cannot rot.

Each page runs in a fresh namespace in a temporary working directory: first the README's blocks (the docs pages
continue its ten lines, as they say), then the page's own blocks in order. "Small size" changes sizes only, never
the code: every split of the embedded VADER task is cut to its first 48 rows, `fit` / `fit_posterior` take 4
steps instead of their `num_epochs`, and the diagnostics draw at most 20 posterior samples per chain. A block may
be left out only when it needs several processes or a GPU, and it must say so in its first line
(``# needs torchrun: ...`` or ``# needs a GPU: ...``). Warnings inside the examples are not errors here (ArviZ,
for one, warns about high Pareto k on tiny data); exceptions are.
"""

import functools
import re
import traceback
import warnings
from pathlib import Path

import pytest

import pyrolora
import pyrolora.data

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"# needs (torchrun|a GPU)\b.*:")
ROWS, STEPS, DRAWS = 48, 4, 20


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block of a Markdown page (line of its first code line)."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def runnable(blocks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(line, code) for line, code in blocks if not SKIP.match(code.lstrip().splitlines()[0])]


@pytest.fixture
def small(monkeypatch, tmp_path):
    """Small sizes for the examples: VADER cut to ROWS rows per split, STEPS optimisation steps per fit."""
    vader = pyrolora.data.vader_splits

    @functools.wraps(vader)
    def small_vader(*args, **kwargs):
        return {name: split.subset(range(min(ROWS, len(split)))) for name, split in vader(*args, **kwargs).items()}

    def few_steps(fit):
        @functools.wraps(fit)
        def wrapped(*args, num_epochs=None, **kwargs):
            if num_epochs is not None:
                kwargs["num_steps"] = STEPS
            return fit(*args, **kwargs)

        return wrapped

    def few_draws(function):
        @functools.wraps(function)
        def wrapped(*args, num_samples=DRAWS, **kwargs):
            return function(*args, num_samples=min(num_samples, DRAWS), **kwargs)

        return wrapped

    monkeypatch.setattr(pyrolora.data, "vader_splits", small_vader)
    for name in ("to_inference_data", "pareto_k"):
        monkeypatch.setattr(pyrolora.diagnostics, name, few_draws(getattr(pyrolora.diagnostics, name)))
    monkeypatch.setattr(pyrolora, "fit", few_steps(pyrolora.fit))
    monkeypatch.setattr(pyrolora, "fit_posterior", few_steps(pyrolora.fit_posterior))
    monkeypatch.chdir(tmp_path)


def run_blocks(page: Path, blocks: list[tuple[int, str]], namespace: dict) -> None:
    for line, code in blocks:
        where = f"{page.relative_to(ROOT)}:{line}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(compile(code, where, "exec"), namespace)
        except Exception:
            pytest.fail(f"the example at {where} raised:\n{traceback.format_exc()}", pytrace=False)


def test_every_page_has_its_examples_found_and_only_multi_process_ones_are_skipped():
    readme = python_blocks(ROOT / "README.md")
    assert len(runnable(readme)) >= 2  # the ten lines and the datasets example
    for page in PAGES:
        for line, code in python_blocks(page):
            first = code.lstrip().splitlines()[0]
            if first.startswith("# needs"):
                assert SKIP.match(first), f"{page.name}:{line}: a skip must say it needs torchrun or a GPU, and why"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(python_blocks(p))], ids=lambda p: p.name)
def test_the_python_examples_of_each_page_run(page, small):
    namespace: dict = {"__name__": "__docs__"}
    readme = runnable(python_blocks(ROOT / "README.md"))
    run_blocks(ROOT / "README.md", readme, namespace)
    if page.name != "README.md":
        run_blocks(page, runnable(python_blocks(page)), namespace)
