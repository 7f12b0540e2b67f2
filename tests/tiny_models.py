"""Tiny random-weight grounding models built offline, for end-to-end backend tests.

Each builder writes a complete checkpoint directory (config, safetensors weights, processor
and a tokenizer built from a small vocabulary written here) that the backends load with
``from_pretrained(path)`` exactly as they would load the real Hub checkpoints. Outputs are
random; the tests only check that they come back as well-formed part boxes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

WORDS = ["the", "head", "of", "person", "upper", "body", "legs", "a", "photo"]


def _quiet() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def write_clip_bpe(path: Path, words: list[str] = WORDS) -> tuple[Path, Path]:
    """A CLIP byte-level BPE vocabulary and merges for ``words`` (every letter + whole words)."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(words)) | set(".")):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for w in words:  # left-to-right merges building each whole word
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merge = f"{toks[0]} {toks[1]}"
            if merge not in merges:
                merges.append(merge)
            toks = [toks[0] + toks[1]] + toks[2:]
            vocab.setdefault(toks[0], len(vocab))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path / "vocab.json", path / "merges.txt"


def build_owlv2(path: Path, seed: int = 0) -> Path:
    """Tiny OWLv2 (1-layer text/vision towers, 64x64 input, 16 boxes) with a CLIP tokenizer."""
    _quiet()
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    vocab_file, merges_file = write_clip_bpe(path)
    tok = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=16)
    cfg = Owlv2Config(
        text_config=dict(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(cfg).eval().save_pretrained(path)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok).save_pretrained(path)
    return path


def build_grounding_dino(path: Path, seed: int = 0) -> Path:
    """Tiny Grounding DINO (tiny Swin backbone, 1-layer BERT, 20 queries) with a WordPiece vocab."""
    _quiet()
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(path / "vocab.txt"))
    swin = SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4]
    )
    cfg = GroundingDinoConfig(
        backbone_config=swin,
        text_config=dict(
            vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64,
        ),
        num_queries=20, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, max_text_len=32,
        encoder_n_points=1, decoder_n_points=1, num_feature_levels=4,
    )  # fmt: skip  (d_model: GroupNorm(32); decoder_layers >= 2 for the tied bbox heads)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(cfg).eval().save_pretrained(path)
    ip = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


FLORENCE_POST_PROCESSOR_CONFIG = {
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "bboxes": {},
}


def build_florence2(path: Path, seed: int = 0) -> Path:
    """Tiny Florence-2 (1-stage DaViT, 1+1-layer BART, 32x32 input -> 17 image tokens).

    The tokenizer is a byte-level BPE with all 256 byte symbols, no merges, the ``<image>``
    token and the 1000 ``<loc_k>`` tokens.
    """
    _quiet()
    from transformers import BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = BartTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), extra_special_tokens={"image_token": "<image>"})
    tok.add_tokens([f"<loc_{i}>" for i in range(1000)])
    image_processor = CLIPImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=17
    )
    cfg = Florence2Config(
        vision_config=dict(
            depths=[1], patch_size=[7], patch_stride=[8], patch_padding=[3], patch_prenorm=[False], embed_dim=[16],
            num_heads=[2], num_groups=[2], window_size=2, projection_dim=16, drop_path_rate=0.0,
        ),
        text_config=dict(
            model_type="bart", vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
            max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.image_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(cfg).eval().save_pretrained(path)
    Florence2Processor(
        image_processor=image_processor, tokenizer=tok, post_processor_config=FLORENCE_POST_PROCESSOR_CONFIG
    ).save_pretrained(path)
    return path


def build_vitpose(path: Path, seed: int = 0) -> Path:
    """Tiny ViTPose (1-layer ViT backbone, 64x48 input, 17 COCO keypoint heatmaps)."""
    _quiet()
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    backbone = VitPoseBackboneConfig(
        image_size=(64, 48), patch_size=(16, 16), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, out_indices=[1]
    )
    torch.manual_seed(seed)
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)).eval().save_pretrained(path)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(path)
    return path
