"""Write configs/<protocol slug>.yaml for every registered protocol (run once; the YAML files are the source of truth).

Paper protocols get the paper's hyper-parameters (section 4.2): ViT-B/16 with OpenAI weights, 120 + 60 epochs,
RMP with 2 heads, 8 when training on MSMT17 or on several sources. Synthetic protocols get small CPU settings.
"""
from __future__ import annotations

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
        "data": {"protocol": name, "data_root": "data"},
        "grounding": {"backend": "cogvlm", "trust_remote_code": True},
        "model": {"backbone": "vit-b-16", "pretrained": "openai", "rmp_heads": heads},
    }
    head = (f"# {name}: {' + '.join(proto.sources)} -> {proto.target}. The paper's settings (section 4.2);\n"
            "# the datasets go under data/ (see README). Grounding with CogVLM needs environment-cogvlm.yml;\n"
            "# any other backend works too (-p backend=florence2 ...).\n")
    return head + yaml.safe_dump(body, sort_keys=False)


def main() -> None:
    for name in list_protocols():
        path = OUT / f"{protocol_slug(name)}.yaml"
        if get_protocol(name).synthetic:
            if path.name == "synth_A2B.yaml":
                continue
            text = SYNTH_TEMPLATE.replace('protocol: "synth:A2B"', f'protocol: "{name}"').replace(
                "train on domain A, test on domain B", f"{name}")
            if len(get_protocol(name).sources) > 1:
                text = text.replace("Synthetic single-source protocol", "Synthetic multi-source protocol")
        else:
            text = paper_config(name)
        path.write_text(text)
        print(path)


if __name__ == "__main__":
    main()
