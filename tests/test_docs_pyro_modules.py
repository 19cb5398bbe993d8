"""The worked example of ``docs/pyro-modules.md`` runs as written: its self-contained python block is executed."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "pyro-modules.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_custom_pyro_model_example_fits_and_reads_in_arviz(capsys):
    examples = [b for b in _blocks() if "import pyrolora" in b]  # the self-contained one (others are fragments)
    assert len(examples) == 1, "docs/pyro-modules.md should hold exactly one self-contained example"
    namespace: dict = {}
    exec(compile(examples[0], str(DOC), "exec"), namespace)
    summary = namespace["idata"].posterior
    names = set(summary.data_vars)
    assert {"tau", "0.scale", "2.scale", "4.scale"} == names
    # the fit moved the posterior: the three layers' scales are learnt apart (they start from one guide init)
    means = {n: float(summary[n].mean()) for n in names}
    assert max(means[f"{i}.scale"] for i in (0, 2, 4)) > 2 * min(means[f"{i}.scale"] for i in (0, 2, 4))
    assert "tau" in capsys.readouterr().out  # az.summary printed its table
    model = namespace["model"]
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen weights stayed frozen


def test_the_fragments_name_only_the_public_api():
    text = "\n".join(_blocks())
    import pyrolora

    for name in re.findall(r"pyrolora\.(\w+)", text):
        assert hasattr(pyrolora, name), name
