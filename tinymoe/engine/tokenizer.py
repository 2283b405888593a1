"""The tokenizer (Hugging Face `tokenizers`, from tokenizer.json) and streamed detokenisation."""

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
