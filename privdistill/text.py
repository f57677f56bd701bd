"""Small text encoder for prompt conditioning: a word-level tokenizer trained locally on the prompt
vocabulary (which doubles as the allow-list of words a prompt may contain) and a CLIP-style
transformer built from config. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from privdistill.config import ModelConfig
from privdistill.errors import ConfigError

SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}


def train_tokenizer(prompts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is exactly the words of ``prompts`` (lower-cased)."""
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values()), min_frequency=1)
    tok.train_from_iterator(sorted(set(prompts)), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[BOS]", "[EOS]")],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def vocabulary(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """The allow-listed words (special tokens excluded)."""
    specials = set(SPECIAL.values())
    return sorted(w for w in tokenizer.get_vocab() if w not in specials)


def build_text_encoder(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    heads = 4 if cfg.text_encoder_dim % 4 == 0 else 1
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_encoder_dim,
        intermediate_size=2 * cfg.text_encoder_dim,
        num_hidden_layers=cfg.text_encoder_layers,
        num_attention_heads=heads,
        max_position_embeddings=cfg.text_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def load_text_encoder(path: Path) -> tuple[CLIPTextModel, PreTrainedTokenizerFast]:
    """Load an encoder and tokenizer saved with ``save_pretrained`` from a LOCAL directory."""
    enc_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir, local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(enc_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError([f"text_encoder_path: cannot load a text encoder from {path}: {err}"]) from None
    return encoder, tokenizer


def encode_prompts(
    encoder: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompts: list[str], max_length: int,
    device: torch.device,
) -> torch.Tensor:
    """Prompts -> [B, L, D] hidden states used as cross-attention context (``encoder``: a CLIPTextModel, or a
    wrapper of one such as DistributedDataParallel)."""
    batch = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    out = encoder(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    return out.last_hidden_state
