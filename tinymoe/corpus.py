"""Text in, token ids out: the demo model's corpus and the text the tools read.

The demo model (train.py) learns from the reST sources of the Python documentation:
    1. corpus      reST -> the plain text a reader sees, split by file into train/held-out
    2. tokenizer   byte-level BPE (Hugging Face `tokenizers`) trained on the train split
    3. token ids   each split encoded once and cached as .npy beside the text (`prepare_data`)
The calibration and evaluation tools read any UTF-8 file as token windows (`read_token_ids`).

The corpus comes from a Debian package: `apt-get install python3.11-doc` puts the sources under
/usr/share/doc/python3.11/html/_sources/ (PSF licence).

An out-of-domain held-out text, of another kind than anything the model or its calibration saw,
comes from another package's man pages rendered as a terminal shows them (`man_text`; git's by
default, `apt-get install git-man`): `python -m tinymoe.corpus --man-package git-man --out FILE`.
"""

import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from tinymoe.cli import OneLineParser, check_output_file, run_cli
from tinymoe.engine.tokenizer import load_tokenizer
from tinymoe.errors import TinyMoeError

EOS = "<|endoftext|>"  # the one special token; also separates documents in the token stream
DEFAULT_CORPUS = "/usr/share/doc/python3.11/html/_sources"

# ---------------------------------------------------------------------------------------------
# 1. Corpus: reST -> plain text
# ---------------------------------------------------------------------------------------------

# Directives whose whole block is navigation or build machinery, not prose: dropped.
DROP_BLOCK = {
    "toctree", "index", "include", "literalinclude", "image", "figure", "highlight", "raw",
    "tabularcolumns", "sectionauthor", "moduleauthor", "currentmodule", "module", "testsetup",
    "testcleanup", "contents", "audit-event", "program", "productionlist", "only",
}  # fmt: skip
# Directives that render as a lead-in sentence. {arg} is a version number (the argument's first
# word; any remark after it is kept); other lead-ins are followed by the whole argument.
LEAD_IN = {
    "note": "Note:",
    "warning": "Warning:",
    "important": "Important:",
    "caution": "Caution:",
    "seealso": "See also:",
    "impl-detail": "CPython implementation detail:",
    "versionadded": "New in version {arg}.",
    "versionchanged": "Changed in version {arg}.",
    "deprecated": "Deprecated since version {arg}.",
    "deprecated-removed": "Deprecated since version {arg}.",
    "availability": "Availability:",
}
# Any other directive keeps its argument (a signature such as `print(*objects, sep=' ')`, a
# rubric's title) and its content (a code block, a table); only the `.. name::` syntax goes.

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")  # .. name:: argument
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, link targets `.. _x:`, substitutions
_OPTION = re.compile(r"^\s+:[\w -]+:")  # a directive option line such as `   :noindex:`
_RULE = re.compile(r"^\s*([=\-~^*#\"'`+.:_])\1{2,}\s*$")  # heading under/overline
_TABLE_RULE = re.compile(r"^\s*(\+[-=+]+\+|[= ]*={3,}[= ]*)\s*$")  # grid/simple table borders
_ROLE = re.compile(r":[\w:+.-]+:`([^`]+)`")  # :func:`print`
_LITERAL = re.compile(r"``([^`]+)``")  # ``x = 1``
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{0,2}")  # `text <https://...>`_
_NAMED_REF = re.compile(r"`([^`]+)`_{1,2}")  # `Some title`_


def _role_text(m: re.Match) -> str:
    """What Sphinx shows for a role: "title <target>" -> title, "~a.b.c" -> c, "!x" -> x."""
    text = re.sub(r"\s*<[^>]*>$", "", m.group(1))
    kind = m.group(0).split("`", 1)[0]
    if kind in (":pep:", ":rfc:"):
        return f"{kind.strip(':').upper()} {text}"
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def _inline(line: str) -> str:
    line = _ROLE.sub(_role_text, line)
    line = _LITERAL.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    return _NAMED_REF.sub(r"\1", line)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def clean_rst(text: str) -> str:
    """reST source -> the plain text a reader sees: prose and code kept, markup syntax removed."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        directive = _DIRECTIVE.match(line)
        if directive or _COMMENT.match(line):
            # Skip option lines; then either drop the indented block or keep it as content.
            base = _indent(line)
            while i < len(lines) and _OPTION.match(lines[i]):
                i += 1
            name, arg = (directive.group(2), directive.group(3).strip()) if directive else ("", "")
            if not directive or name in DROP_BLOCK:
                while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                    i += 1
                continue
            lead = arg  # a signature, a title, or nothing
            if name in LEAD_IN and "{arg}" in LEAD_IN[name]:  # versions: "3.2" plus any remark
                version, _, remark = arg.partition(" ")
                lead = f"{LEAD_IN[name].format(arg=version)} {remark}".strip()
            elif name in LEAD_IN:
                lead = f"{LEAD_IN[name]} {arg}".strip()
            if lead:
                out.append(" " * base + _inline(lead))
            continue
        if _RULE.match(line) or _TABLE_RULE.match(line) or line.strip() == "::":
            continue
        line = line.rstrip()
        if line.endswith("::"):  # "Example::" introduces a literal block; Sphinx shows "Example:"
            line = line[:-2].rstrip() + ("" if line.endswith(" ::") else ":")
        out.append(_inline(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def prepare_corpus(corpus_dir: Path, data_dir: Path, holdout_every: int) -> dict[str, int]:
    """Clean every *.rst.txt; every `holdout_every`-th file (sorted by path) is held out.

    Writes data_dir/{train,heldout}.txt, documents separated by the EOS token. Returns file counts.
    """
    if holdout_every < 2:
        raise TinyMoeError("--holdout-every must be >= 2 (1 would hold out every file)")
    files = sorted(corpus_dir.rglob("*.rst.txt"))
    if not files:
        raise TinyMoeError(
            f"--corpus-dir {corpus_dir}: no *.rst.txt files; install them with "
            "`apt-get install python3.11-doc` or point --corpus-dir at a Sphinx _sources folder"
        )
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    for n, f in enumerate(files):
        split = "heldout" if n % holdout_every == holdout_every - 1 else "train"
        splits[split].append(clean_rst(f.read_text(encoding="utf-8", errors="replace")))
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        (data_dir / f"{split}.txt").write_text(EOS.join(docs), encoding="utf-8")
    return {split: len(docs) for split, docs in splits.items()}


# ---------------------------------------------------------------------------------------------
# 2. Tokenizer (byte-level BPE) and token ids
# ---------------------------------------------------------------------------------------------


def train_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): any byte sequence encodes, and decoding is lossless."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_text.split(EOS), trainer=trainer)
    return tok


def encode_split(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids of a split (documents joined by EOS) as a flat uint16 array."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(text.split(EOS)):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def prepare_data(
    corpus_dir: str | Path, data_dir: str | Path, holdout_every: int, vocab_size: int
) -> tuple[Tokenizer, Tensor, Tensor]:
    """The tokenizer and the train and held-out token ids (1-D, int64), cached in `data_dir`.

    The cache is rebuilt from `corpus_dir` when it is missing or its vocabulary size differs.
    """
    data = Path(data_dir)
    tok_path = data / "tokenizer.json"
    if tok_path.exists() and (data / "train.npy").exists():
        tok = Tokenizer.from_file(str(tok_path))
        if tok.get_vocab_size() == vocab_size:
            train, held = np.load(data / "train.npy"), np.load(data / "heldout.npy")
            return tok, _as_ids(train), _as_ids(held)
    counts = prepare_corpus(Path(corpus_dir), data, holdout_every)
    train_text = (data / "train.txt").read_text(encoding="utf-8")
    held_text = (data / "heldout.txt").read_text(encoding="utf-8")
    print(
        f"corpus: {counts['train']} train files, {counts['heldout']} held-out files",
        file=sys.stderr,
    )
    tok = train_tokenizer(train_text, vocab_size)
    tok.save(str(tok_path))
    train, held = encode_split(tok, train_text), encode_split(tok, held_text)
    np.save(data / "train.npy", train)
    np.save(data / "heldout.npy", held)
    return tok, _as_ids(train), _as_ids(held)


def _as_ids(a: np.ndarray) -> Tensor:
    return torch.from_numpy(a.astype(np.int64))  # uint16 on disk, int64 for embedding lookups


# ---------------------------------------------------------------------------------------------
# 3. Out-of-domain held-out text: a Debian package's man pages, as a terminal shows them
# ---------------------------------------------------------------------------------------------

DEFAULT_MAN_PACKAGE = "git-man"  # 191 pages of git's manual (GPL-2): prose about another tool
# groff as `man` runs it, without escapes for bold or underline (-P-cbou) or hyphenation.
GROFF = ("groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=80n", "-rHY=0")


def man_pages(package: str) -> list[Path]:
    """The man pages a Debian package installed (/usr/share/man/man*/...), sorted by path."""
    try:
        listed = subprocess.run(
            ["dpkg-query", "-L", package], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        raise TinyMoeError(
            f"--man-package {package}: not installed (or no dpkg here); install it with "
            f"`apt-get install {package}`"
        ) from None
    pages = sorted(Path(f) for f in listed if re.match(r"/usr/share/man/man\d/", f))
    pages = [p for p in pages if p.is_file() and not p.is_symlink()]  # aliases repeat a page
    if not pages:
        raise TinyMoeError(f"--man-package {package}: installs no man pages")
    return pages


def render_man(page: Path) -> str:
    """A man page (roff, gzipped or not) -> the plain text `man` shows, without the running
    header and footer lines (the page's title and the package's version on every page)."""
    raw = page.read_bytes()
    if page.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        out = subprocess.run(GROFF, input=raw, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise TinyMoeError(
            "groff not found: `apt-get install groff-base` renders man pages"
        ) from None
    lines = out.decode("utf-8", errors="replace").rstrip().splitlines()
    body = "\n".join(line.rstrip() for line in lines[1:-1])  # header and footer go
    return re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"


def man_text(package: str) -> tuple[str, int]:
    """Every man page of `package`, rendered, joined by EOS as the corpus splits: (text, pages)."""
    pages = man_pages(package)
    return EOS.join(render_man(p) for p in pages), len(pages)


def build_parser() -> OneLineParser:
    p = OneLineParser("corpus", description="Build the out-of-domain held-out text (man pages).")
    p.add_argument(
        "--man-package",
        default=DEFAULT_MAN_PACKAGE,
        metavar="PKG",
        help="Debian package whose man pages are rendered",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = check_output_file(args.out, "--out")
    text, pages = man_text(args.man_package)
    Path(out).write_text(text, encoding="utf-8")
    print(
        f"corpus: {pages} man pages of {args.man_package}, {len(text):,} characters -> {out}",
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Token windows of any text file (calibration, evaluation)
# ---------------------------------------------------------------------------------------------

CHARS_PER_TOKEN = 200  # how much text read_token_ids reads: ~50x more tokens than it keeps


def read_token_ids(
    model_dir: str | Path, text_path: str | Path, tokens: int, seq_len: int
) -> Tensor:
    """`tokens` tokens of a UTF-8 file as (B, seq_len) windows, B = tokens // seq_len.

    The windows are spread evenly over the text (at most its first CHARS_PER_TOKEN * tokens
    characters), so they sample many documents rather than the first few.
    """
    if seq_len < 2:
        raise TinyMoeError(f"--seq-len must be >= 2, got {seq_len}")
    if tokens < seq_len:
        raise TinyMoeError(f"--tokens ({tokens}) must be at least --seq-len ({seq_len})")
    tok = load_tokenizer(model_dir)
    path = Path(text_path)
    if not path.is_file():
        raise TinyMoeError(f"--text {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(CHARS_PER_TOKEN * tokens)
    except UnicodeDecodeError as e:
        raise TinyMoeError(f"--text {path}: not UTF-8 text ({e})") from None
    ids = torch.tensor(tok.encode(text).ids)  # (n,)
    B = min(len(ids), tokens) // seq_len
    if B == 0:
        raise TinyMoeError(
            f"--text {path}: encodes to {len(ids)} tokens, fewer than one --seq-len ({seq_len})"
        )
    starts = torch.linspace(0, len(ids) - seq_len, B).long().tolist()  # never overlapping
    return torch.stack([ids[s : s + seq_len] for s in starts])  # (B, T)


def fewer_tokens(ids: Tensor, asked: int) -> str:
    """Why the windows `ids` (B, T) hold fewer than the `asked` --tokens: a note for stderr."""
    B, T = ids.shape
    why = "the text is shorter" if asked // T > B else "--tokens is not a multiple of --seq-len"
    return f"using {B * T:,} tokens ({B} windows of {T}), fewer than --tokens {asked:,}: {why}"


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
