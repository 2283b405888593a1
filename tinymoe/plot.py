"""matplotlib, only when a tool is asked for a plot (`--plot FILE`): an optional extra."""

from tinymoe.errors import TinyMoeError


def pyplot():
    """matplotlib.pyplot, or a TinyMoeError naming the extra: tools check this before any work."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise TinyMoeError(
            '--plot needs matplotlib, which is not installed: pip install -e ".[plot]" (or '
            "pip install 'tinymoe[plot]')"
        ) from None
    return plt
