"""Text for the speech corpus: what is spoken, and what the model should answer.

Transcripts are lower-case words with numbers spoken as words ("twenty five"); responses use digits.
Three response skills are taught (spoken arithmetic, home control and timers, a fixed polite fallback);
everything else is plain transcription. Knows nothing about voices or audio.
"""

import functools
import glob
import inspect
import json
import random
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORD_LIST = Path("/usr/share/dict/american-english")
WORDNET_DIR = Path("/usr/share/wordnet")
EVAL_SENTENCES = Path(__file__).with_name("eval_sentences.txt")

FALLBACK = "sorry, i can only do arithmetic, lights, thermostat, timers and alarms."
MAX_WORDS = 24  # ~8 s of speech at the slowest voices; keeps batches short
MAX_CHARS = 140

# The mix of utterance kinds drawn for training (fractions sum to 1).
KIND_WEIGHTS = {
    "sentence": 0.42,  # WordNet examples, fortunes and stdlib docstrings, whole or a span of words
    "template": 0.16,  # numbers, times, dates, names, commands
    "words": 0.04,  # random dictionary words: no language model to lean on
    "arithmetic": 0.18,
    "home": 0.20,
}


@dataclass(frozen=True)
class Utterance:
    text: str  # what is spoken: lower-case words, numbers as words
    response: str  # what the model answers when asked to respond (FALLBACK for plain speech)
    kind: str  # one of KIND_WEIGHTS


# ---- numbers as words ------------------------------------------------------------------------------

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINALS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def number_words(n: int) -> str:
    """0 <= n < 10**9 as spoken words: 125 -> 'one hundred twenty five'."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = "" if n % size == 0 else " " + number_words(n % size)
            return f"{number_words(n // size)} {name}{rest}"
    raise AssertionError(n)


def ordinal_words(n: int) -> str:
    """21 -> 'twenty first'."""
    *head, last = number_words(n).split()
    if last in ORDINALS:
        last = ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def year_words(y: int) -> str:
    """1984 -> 'nineteen eighty four', 2005 -> 'two thousand five'."""
    if 2000 <= y < 2010:
        return number_words(y)
    hi, lo = divmod(y, 100)
    return (
        number_words(hi) + " " + ("hundred" if lo == 0 else f"oh {ONES[lo]}" if lo < 10 else number_words(lo))
    )


# ---- normalizing free text -------------------------------------------------------------------------

SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "=": " equals ", "@": " at ", "$": " dollars "}


def _digits_to_words(match: re.Match) -> str:
    digits = match.group(0)
    if len(digits) <= 6 and not digits.startswith("0"):
        return f" {number_words(int(digits))} "
    return " " + " ".join(ONES[int(d)] for d in digits) + " "


def normalize(text: str) -> str | None:
    """Free text -> spoken form ('a-z', apostrophe, space), or None if it cannot be said cleanly."""
    text = text.lower()
    for sym, word in SYMBOLS.items():
        text = text.replace(sym, word)
    text = re.sub(r"\d+", _digits_to_words, text)
    text = re.sub(r"[-_/]", " ", text)
    text = re.sub(r"[.,;:!?\"()\[\]{}*]", " ", text)
    text = re.sub(r"(^|\s)'+|'+(\s|$)", " ", text)  # quotes, not apostrophes
    words = text.split()
    if not words or not re.fullmatch(r"[a-z' ]+", " ".join(words)):
        return None
    return " ".join(words)


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def _clean_sentences(raw: list[str]) -> list[str]:
    out = set()
    for sentence in raw:
        spoken = normalize(sentence)
        if spoken and 2 <= len(spoken.split()) <= MAX_WORDS and len(spoken) <= MAX_CHARS:
            out.add(spoken)
    return sorted(out)


@functools.cache
def fortune_sentences() -> list[str]:
    raw = []
    for path in sorted(glob.glob(str(FORTUNE_DIR / "*"))):
        if "." in Path(path).name:
            continue
        for entry in Path(path).read_text(errors="ignore").split("\n%\n"):
            if not re.search(r"^\s|\t", entry, re.M):  # skip verse, tables and ascii art
                raw.extend(split_sentences(entry))
    return _clean_sentences(raw)


@functools.cache
def docstring_sentences() -> list[str]:
    """Prose from the Python standard library's own docstrings (first paragraph of each)."""
    raw = []  # the standard library alone: importing every package on the path (a GPU machine's jax,
    # cupy, lightning...) is slow and draws prose that differs from one machine to the next
    for mod in sorted(m for m in sys.stdlib_module_names if not m.startswith("_")):
        if mod in {"antigravity", "this", "idlelib", "turtledemo", "tkinter"}:
            continue
        raw.extend(_module_docstrings(mod))
    return _clean_sentences(raw)


def _module_docstrings(name: str) -> list[str]:
    import contextlib
    import importlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mod = importlib.import_module(name)
    except BaseException:
        return []
    if not getattr(mod, "__file__", None) or "site-packages" in (mod.__file__ or ""):
        return []
    docs = [inspect.getdoc(mod) or ""]
    docs += [inspect.getdoc(obj) or "" for _, obj in sorted(vars(mod).items()) if callable(obj)]
    return [s for d in docs for s in split_sentences(d.split("\n\n")[0]) if ">>>" not in s]


@functools.cache
def wordnet_sentences() -> list[str]:
    """WordNet's usage examples (the quoted parts of its glosses): ~48k short sentences of everyday
    English over its whole vocabulary. fortunes-min's and the docstrings' ~3.3k sentences alone were
    memorized (training loss far below the held-out one) instead of heard."""
    raw = []
    for path in sorted(WORDNET_DIR.glob("data.*")):
        for line in path.read_text(errors="ignore").splitlines():
            if not line.startswith("  ") and "|" in line:  # "  " starts the license header
                raw += re.findall(r'"([^"]+)"', line.split("|", 1)[1])
    return _clean_sentences(raw)


@functools.cache
def dictionary() -> tuple[list[str], list[str]]:
    """(common lower-case words, first names) from the Debian word list."""
    words, names = [], []
    for w in WORD_LIST.read_text(errors="ignore").split():
        if re.fullmatch(r"[a-z]{2,10}", w):
            words.append(w)
        elif re.fullmatch(r"[A-Z][a-z]{2,8}", w):
            names.append(w.lower())
    return words, names


# ---- templates and skills --------------------------------------------------------------------------

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
ROOMS = ["bedroom", "kitchen", "living room", "bathroom", "office", "hallway", "garage", "dining room"]
ROOMS += ["basement", "porch", "kids room", "guest room"]
VERBS = [
    "call",
    "email",
    "text",
    "remind",
    "meet",
    "visit",
    "pay",
    "book",
    "cancel",
    "find",
    "open",
    "close",
    "play",
    "stop",
]
THINGS = [
    "the",
    "report",
    "the",
    "groceries",
    "the",
    "car",
    "the",
    "meeting",
    "the",
    "doctor",
    "the",
    "dentist",
    "my",
    "mother",
    "the",
    "tickets",
    "the",
    "bills",
    "the",
    "music",
    "the",
    "door",
    "the",
    "window",
    "the",
    "garden",
    "the",
    "laundry",
]
THINGS = [" ".join(THINGS[i : i + 2]) for i in range(0, len(THINGS), 2)]


def time_words(rng: random.Random) -> tuple[str, int, int]:
    """A spoken clock time and its (hour, minute) on a 24 h clock. Without "a m" or "p m" the hour is
    the one spoken ("four thirty" -> 04:30, "twelve" -> 12:00): a label that depends on an unspoken
    half of the day is a coin flip the model cannot learn (it was one before the alarm-label stage)."""
    hour, minute = (
        rng.randint(1, 12),
        rng.choice([0, 0, 5, 10, 15, 20, 30, 30, 40, 45, 50, rng.randint(0, 59)]),
    )
    pm = rng.random() < 0.5
    if minute == 0:
        spoken = f"{number_words(hour)} {rng.choice(['o clock', 'am' if not pm else 'pm', ''])}".strip()
    elif minute < 10:
        spoken = f"{number_words(hour)} oh {number_words(minute)}"
    else:
        spoken = f"{number_words(hour)} {number_words(minute)}"
    if rng.random() < 0.3 and minute != 0:
        spoken += " pm" if pm else " am"
    if spoken.endswith(("am", "pm")):
        hour = hour % 12 + (12 if pm else 0)
    return spoken.replace("am", "a m").replace("pm", "p m"), hour, minute


def template_sentence(rng: random.Random) -> str:
    _, names = dictionary()
    name, day, month = rng.choice(names), rng.choice(WEEKDAYS), rng.choice(MONTHS)
    clock = time_words(rng)[0]
    n = rng.choice([rng.randint(0, 20), rng.randint(0, 100), rng.randint(100, 10**4), rng.randint(0, 10**6)])
    options = [
        f"call {name} at {' '.join(ONES[rng.randint(0, 9)] for _ in range(rng.choice([3, 4, 7])))}",
        f"meet me at {clock} on {day}",
        f"the meeting with {name} is on {day} at {clock}",
        f"my birthday is on {month} {ordinal_words(rng.randint(1, 31))}",
        f"she was born in {year_words(rng.randint(1900, 2029))}",
        f"it costs {number_words(n)} dollars",
        f"it costs {number_words(rng.randint(1, 99))} dollars and {number_words(rng.randint(1, 99))} cents",
        f"{rng.choice(VERBS)} {rng.choice(THINGS)} on {day}",
        f"remind me to {rng.choice(VERBS)} {rng.choice(THINGS)} at {clock}",
        f"send a message to {name} saying i will be late",
        f"the score was {number_words(rng.randint(0, 30))} to {number_words(rng.randint(0, 30))}",
        f"there are {number_words(n)} people in the room",
        f"page {number_words(rng.randint(1, 500))} chapter {number_words(rng.randint(1, 40))}",
        f"{name} and {rng.choice(names)} arrive on {month} {ordinal_words(rng.randint(1, 31))}",
        f"{number_words(n)}",
        f"the {ordinal_words(rng.randint(1, 100))} time",
    ]
    return rng.choice(options)


ASK = ["what is", "what's", "how much is", "calculate", "compute", "tell me", "what do you get for", ""]


def arithmetic(rng: random.Random) -> Utterance:
    op = rng.choice(["plus", "plus", "minus", "minus", "times"])
    hi = 12 if op == "times" else 100
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    spoken_op = {
        "plus": rng.choice(["plus", "plus", "and"]),
        "minus": "minus",
        "times": rng.choice(["times", "multiplied by"]),
    }[op]
    text = f"{rng.choice(ASK)} {number_words(a)} {spoken_op} {number_words(b)}".strip()
    result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    sym = {"plus": "+", "minus": "-", "times": "×"}[op]
    return Utterance(text, f"{a} {sym} {b} = {result}", "arithmetic")


def _intent(reply: str, **fields) -> str:
    return f"ok, {reply}. " + json.dumps(fields, separators=(",", ":"))


def home_command(rng: random.Random) -> Utterance:
    room, skill = rng.choice(ROOMS), rng.choice(["level", "level", "onoff", "thermostat", "timer", "alarm"])
    if skill == "level":
        level = rng.choice([rng.randint(1, 100), rng.randrange(10, 100, 10)])
        verb = rng.choice(["dim", "set", "turn", "put", "change"])
        text = f"{verb} the {room} lights to {number_words(level)} percent"
        return Utterance(
            text, _intent(f"{room} lights at {level}%", intent="set_light", room=room, level=level), "home"
        )
    if skill == "onoff":
        on = rng.random() < 0.5
        text = rng.choice(
            [
                f"turn {'on' if on else 'off'} the {room} lights",
                f"switch the {room} lights {'on' if on else 'off'}",
            ]
        )
        reply = f"{room} lights {'on' if on else 'off'}"
        return Utterance(text, _intent(reply, intent="set_light", room=room, level=100 if on else 0), "home")
    if skill == "thermostat":
        deg = rng.randint(55, 85)
        text = rng.choice(
            [f"set the thermostat to {number_words(deg)} degrees", f"make it {number_words(deg)} degrees"]
        )
        return Utterance(
            text, _intent(f"thermostat at {deg} degrees", intent="set_temperature", degrees=deg), "home"
        )
    if skill == "timer":
        n, unit = rng.choice(
            [(rng.randint(1, 90), "minute"), (rng.randint(5, 59), "second"), (rng.randint(1, 5), "hour")]
        )
        units = f"{unit}{'s' if n != 1 else ''}"
        spoken = "one" if n == 1 else number_words(n)
        text = rng.choice(
            [f"set a timer for {spoken} {units}", f"start a {spoken} {unit} timer", f"timer {spoken} {units}"]
        )
        seconds = n * {"second": 1, "minute": 60, "hour": 3600}[unit]
        return Utterance(text, _intent(f"timer for {n} {units}", intent="set_timer", seconds=seconds), "home")
    spoken, hour, minute = time_words(rng)
    text = rng.choice([f"wake me up at {spoken}", f"set an alarm for {spoken}"])
    return Utterance(
        text,
        _intent(f"alarm at {hour:02d}:{minute:02d}", intent="set_alarm", time=f"{hour:02d}:{minute:02d}"),
        "home",
    )


def held_out_sentence(text: str) -> bool:
    """One free-text sentence in 40 is kept for evaluation only (by a stable hash of its text)."""
    return zlib.crc32(text.encode()) % 40 == 0


SENTENCE_SOURCES = {
    "wordnet": wordnet_sentences,
    "fortunes": fortune_sentences,
    "docstrings": docstring_sentences,
}
SOURCE_WEIGHTS = {"wordnet": 0.5, "fortunes": 0.3, "docstrings": 0.2}


@functools.cache
def sentence_pool(source: str, held_out: bool) -> list[str]:
    return [s for s in SENTENCE_SOURCES[source]() if held_out_sentence(s) == held_out]


def sentence(rng: random.Random, held_out: bool = False) -> str:
    source = rng.choices(list(SOURCE_WEIGHTS), weights=list(SOURCE_WEIGHTS.values()))[0]
    pool = sentence_pool(source, held_out)
    words = rng.choice(pool).split()
    if len(words) > 3 and rng.random() < 0.4:  # a span: short utterances and sentence-internal starts
        n = rng.randint(1, len(words) - 1)
        start = rng.randint(0, len(words) - n)
        words = words[start : start + n]
    return " ".join(words)


def sample(rng: random.Random, held_out: bool = False) -> Utterance:
    """One utterance; held_out draws free text only from the sentences kept for evaluation."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "arithmetic":
        return arithmetic(rng)
    if kind == "home":
        return home_command(rng)
    if kind == "template":
        return Utterance(template_sentence(rng), FALLBACK, kind)
    if kind == "words":
        return Utterance(" ".join(rng.sample(dictionary()[0], rng.randint(1, 8))), FALLBACK, kind)
    return Utterance(sentence(rng, held_out), FALLBACK, kind)


def eval_utterances() -> list[Utterance]:
    """The committed held-out evaluation set (text, response, kind per tab-separated line)."""
    lines = EVAL_SENTENCES.read_text().splitlines()
    return [Utterance(*line.split("\t")) for line in lines if line.strip()]


def write_eval_sentences(count: int = 240, seed: int = 1234) -> None:
    """Regenerate export/eval_sentences.txt (deterministic; run once, then commit)."""
    rng = random.Random(seed)
    out = [sample(rng, held_out=True) for _ in range(count)]
    EVAL_SENTENCES.write_text("".join(f"{u.text}\t{u.response}\t{u.kind}\n" for u in out))
