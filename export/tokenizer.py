"""Our subword vocabulary and the Gemma 4 chat-turn prompt format for speech.

The special tokens are Gemma 4's own strings at small ids (pad 0, eos 1, bos 2 as in Gemma); the ids go
into the checkpoint's config.json. Byte-level BPE (every string encodes), digits split one per token
as in Gemma, trained on our corpus text. Streaming ("branch") prompt, instruction before the audio so
the worker can prefill audio while the user turn is still open:

    <bos><|turn>user\\n{instruction}<|audio>{<|audio|> x N}<audio|><turn|>\\n<|turn>model\\n
    {transcript}<turn|>                        (transcribe)
    {transcript}\\n{response}<turn|>            (respond)
"""

import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from export import corpus

SPECIAL_TOKENS = [
    "<pad>",  # 0
    "<eos>",  # 1
    "<bos>",  # 2
    "<unk>",  # 3
    "<|turn>",  # 4  turn start
    "<turn|>",  # 5  turn end
    "<|audio>",  # 6  begin of audio (boa_token_id)
    "<audio|>",  # 7  end of audio (eoa_token_index)
    "<|audio|>",  # 8  audio soft token (audio_token_id)
    "<|image>",  # 9  begin of image (boi_token_id)
    "<image|>",  # 10 end of image (eoi_token_id)
    "<|image|>",  # 11 image soft token (image_token_id)
    "<|video|>",  # 12 video soft token (video_token_id)
]
PAD, EOS, BOS, UNK, TURN_START, TURN_END, BOA, EOA, AUDIO, BOI, EOI, IMAGE, VIDEO = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 1024

INSTRUCT_TRANSCRIBE = "Transcribe the audio."
INSTRUCT_RESPOND = "Transcribe the audio, then respond."


def config_token_ids() -> dict[str, int]:
    """The token ids a gemma4_unified config.json carries, for this vocabulary."""
    return {
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "bos_token_id": BOS,
        "boa_token_id": BOA,
        "eoa_token_index": EOA,
        "audio_token_id": AUDIO,
        "boi_token_id": BOI,
        "eoi_token_id": EOI,
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
    }


def training_text(count: int = 60_000, seed: int = 7) -> list[str]:
    """What the vocabulary is fitted to: corpus draws (transcripts and responses) and the free text."""
    rng = random.Random(seed)
    draws = [corpus.sample(rng) for _ in range(count)]
    text = [u.text for u in draws] + [u.response for u in draws]
    text += corpus.fortune_sentences() + corpus.docstring_sentences()
    return text + [INSTRUCT_TRANSCRIBE, INSTRUCT_RESPOND] * 100


def build(vocab_size: int = VOCAB_SIZE, text: list[str] | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text if text is not None else training_text(), trainer)
    return tok


def load(path: str | Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"{path}: special token {s!r} is not id {i}")
    return tok


@dataclass
class Prompt:
    """One training or inference sequence, as token ids with the audio span marked."""

    ids: list[int]  # AUDIO placeholders where the audio frames go
    audio_start: int  # index of the first AUDIO placeholder
    n_audio: int
    target_start: int  # first index the model is trained to predict (after "<|turn>model\n")


def prompt(tok: Tokenizer, n_audio: int, instruction: str, target: str | None) -> Prompt:
    """The branch-format prompt; target: the model turn's text without <turn|> (None: open for generation)."""
    user = [BOS, TURN_START, *tok.encode("user\n" + instruction).ids, BOA]
    after = [EOA, TURN_END, *tok.encode("\n").ids, TURN_START, *tok.encode("model\n").ids]
    ids = user + [AUDIO] * n_audio + after
    target_start = len(ids)
    if target is not None:
        ids += [*tok.encode(target).ids, TURN_END]
    return Prompt(ids, len(user), n_audio, target_start)


def model_turn(transcript: str, response: str | None) -> str:
    return transcript if response is None else f"{transcript}\n{response}"


def split_turn(text: str) -> tuple[str, str | None]:
    """Inverse of model_turn for decoded output."""
    transcript, _, response = text.partition("\n")
    return transcript.strip(), response.strip() or None


def save(tok: Tokenizer, path: str | Path) -> None:
    tok.save(str(path))
