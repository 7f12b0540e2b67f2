"""Write configs/<protocol slug>.yaml for every registered protocol (run once; the YAML files are the source of truth).

Paper protocols get the paper's hyper-parameters (section 4.2): ViT-B/16 with OpenAI weights, 120 + 60 epochs,
RMP with 2 heads, 8 when training on MSMT17 or on several sources, and the authors' training recipe
(``recipe: reference``, see ``muva_core.config.RECIPES``). Synthetic protocols get small CPU settings (and the
default ``workbook`` recipe). ``python tools/make_configs.py --check`` compares the files with what this writes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from muva_core.data.protocols import get_protocol, list_protocols, protocol_slug

OUT = Path(__file__).resolve().parents[1] / "configs"

SYNTH_TEMPLATE = (OUT / "synth_A2B.yaml").read_text()


def paper_config(name: str) -> str:
    proto = get_protocol(name)
    heads = 8 if (len(proto.sources) > 1 or "msmt17" in proto.sources) else 2
    body = {
        "seed": 0,
        "recipe": "reference",
        "data": {"protocol": name, "data_root": "data"},
        "grounding": {"backend": "cogvlm", "trust_remote_code": True},
        "model": {"backbone": "vit-b-16", "pretrained": "openai", "rmp_heads": heads},
    }
    head = (f"# {name}: {' + '.join(proto.sources)} -> {proto.target}. The paper's settings (section 4.2);\n"
            "# the datasets go under data/ (see docs/real-data.md). Grounding with CogVLM needs environment-cogvlm.yml;\n"
            "# any other backend works too (-p backend=florence2 ...). recipe: reference = the authors' training\n"
            "# recipe (RikoLi/MUVA @ 8965263; -p recipe=workbook for the project's own, any key overrides it).\n")
    return head + yaml.safe_dump(body, sort_keys=False)


def config_text(name: str) -> str | None:
    """The text of ``configs/<slug>.yaml`` for protocol ``name`` (None for synth_A2B, the template itself)."""
    if get_protocol(name).synthetic:
        if protocol_slug(name) == "synth_A2B":
            return None
        text = SYNTH_TEMPLATE.replace('protocol: "synth:A2B"', f'protocol: "{name}"').replace(
            "train on domain A, test on domain B", f"{name}")
        if len(get_protocol(name).sources) > 1:
            text = text.replace("Synthetic single-source protocol", "Synthetic multi-source protocol")
        return text
    return paper_config(name)


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for name in list_protocols():
        path = OUT / f"{protocol_slug(name)}.yaml"
        text = config_text(name)
        if text is None:
            continue
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
            continue
        path.write_text(text)
        print(path)
    for path in stale:
        print(f"out of date: {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
