"""The tokenizer (Hugging Face `tokenizers`, from tokenizer.json), streamed detokenisation and
stop strings."""

from pathlib import Path

from tokenizers import Tokenizer

from tinymoe.errors import TinyMoeError


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise TinyMoeError(f"{path}: not found; tinymoe needs the checkpoint's tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise TinyMoeError(f"{path}: not a valid tokenizer.json ({e})") from None


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait
            return ""
        piece, self.printed = text[self.printed :], len(text)
        return piece


class StopStrings:
    """Watches streamed text for stop strings, holding back what may be the start of one.

    push(piece) returns the text that is safe to show now; once a stop string has appeared,
    `matched` names it and the text from it on is never returned. flush() gives back what was
    held when generation ended without a match.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        if self.matched is not None:
            return ""
        text = self.held + piece
        found = [(text.find(s), s) for s in self.stops if s in text]
        if found:
            at, self.matched = min(found)  # the earliest stop string in the text wins
            self.held = ""
            return text[:at]
        # Hold back the longest end of the text that some stop string begins with.
        keep = max(
            (n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return rest
