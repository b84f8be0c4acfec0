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
SPECIAL_IDS = frozenset(range(len(SPECIAL_TOKENS)))
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
    audio_positions: list[int] | None = None  # where the AUDIO placeholders are (None: one contiguous run)
    trained: list[int] | None = None  # indices the model is trained to predict (None: from target_start on)

    def audio_index(self) -> list[int]:
        if self.audio_positions is not None:
            return self.audio_positions
        return list(range(self.audio_start, self.audio_start + self.n_audio))

    def trained_index(self) -> list[int]:
        return self.trained if self.trained is not None else list(range(self.target_start, len(self.ids)))


def prompt(tok: Tokenizer, n_audio: int, instruction: str, target: str | None) -> Prompt:
    """The branch-format prompt; target: the model turn's text without <turn|> (None: open for generation)."""
    user = [BOS, TURN_START, *tok.encode("user\n" + instruction).ids, BOA]
    after = [EOA, TURN_END, *tok.encode("\n").ids, TURN_START, *tok.encode("model\n").ids]
    ids = user + [AUDIO] * n_audio + after
    target_start = len(ids)
    if target is not None:
        ids += [*tok.encode(target).ids, TURN_END]
    return Prompt(ids, len(user), n_audio, target_start)


def user_turn_start(tok: Tokenizer, instruction: str) -> list[int]:
    return [BOS, TURN_START, *tok.encode("user\n" + instruction).ids]


def model_turn_start(tok: Tokenizer) -> list[int]:
    """Closes the user turn and opens the model's."""
    return [TURN_END, *tok.encode("\n").ids, TURN_START, *tok.encode("model\n").ids]


def chunk_texts(words: list[tuple[str, float]], chunk_seconds: float, n_chunks: int) -> list[str]:
    """The text after each chunk: the words (text, end time) that end within it (word_chunks' spacing);
    every word is out by the last chunk."""
    sizes, said = [], 0
    for k in range(n_chunks):
        end = (k + 1) * chunk_seconds if k < n_chunks - 1 else float("inf")
        sizes.append(sum(1 for _, t in words[said:] if t <= end))
        said += sizes[-1]
    return word_chunks([w for w, _ in words], sizes)


def interleaved_prompt(
    tok: Tokenizer, chunk_frames: list[int], texts: list[str], instruction: str, response: str | None
) -> Prompt:
    """The interleaved prompt: chunk k's frames, then texts[k]. response: the model turn's text without
    <turn|> ("" for transcribe-only). Trained: every chunk's text and the `<|audio>` that follows it
    (the model says "done with this chunk"), and the model turn; not the <turn|> that closes the user
    turn (the end of audio is the worker's to say, not the model's)."""
    ids = user_turn_start(tok, instruction)
    audio, trained = [], []
    for k, (n, text) in enumerate(zip(chunk_frames, texts, strict=True)):
        if k:
            trained.append(len(ids))  # the `<|audio>` after the previous chunk's text
        ids.append(BOA)
        audio += range(len(ids), len(ids) + n)
        ids += [AUDIO] * n + [EOA]
        words = tok.encode(text).ids if text else []
        trained += range(len(ids), len(ids) + len(words))
        ids += words
    ids += model_turn_start(tok)
    target_start = len(ids)
    if response is not None:
        ids += [*tok.encode(response).ids, TURN_END] if response else [TURN_END]
        trained += range(target_start, len(ids))
    return Prompt(ids, audio[0], len(audio), target_start, audio, trained)


def drill_prompt(tok: Tokenizer, texts: list[str], response: str | None) -> Prompt:
    """An interleaved respond prompt with its audio left out: every chunk empty (`<|audio><audio|>`),
    texts[k] after chunk k, then the response, the only part trained (None: open for generation). The
    response sees the same words in the same places as in an interleaved prompt, at about half its
    length."""
    ids = user_turn_start(tok, INSTRUCT_RESPOND)
    for text in texts:
        ids += [BOA, EOA, *(tok.encode(text).ids if text else [])]
    ids += model_turn_start(tok)
    target_start = len(ids)
    if response is not None:
        ids += [*tok.encode(response).ids, TURN_END]
    return Prompt(ids, target_start, 0, target_start, audio_positions=[])


def word_chunks(words: list[str], sizes: list[int]) -> list[str]:
    """sizes[k] words after chunk k, a space before all but the utterance's first word."""
    texts, said = [], 0
    for n in sizes:
        texts.append(("" if said == 0 or n == 0 else " ") + " ".join(words[said : said + n]))
        said += n
    return texts


def model_turn(transcript: str, response: str | None) -> str:
    return transcript if response is None else f"{transcript}\n{response}"


def split_turn(text: str) -> tuple[str, str | None]:
    """Inverse of model_turn for decoded output."""
    transcript, _, response = text.partition("\n")
    return transcript.strip(), response.strip() or None


def save(tok: Tokenizer, path: str | Path) -> None:
    tok.save(str(path))
