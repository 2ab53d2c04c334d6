"""Chat templates: the one `--chat-template` names (a file, or a template bundled with svdserve), and whether a
template shows tools to the model at all."""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
BUNDLED = {path.stem.replace("_", "-"): path for path in TEMPLATES.glob("*.jinja")}  # chatml-tools
# The default model's (SmolLM2-Instruct's) own template has no tools; this one adds them and renders every plain
# chat exactly as it does (tests/api/test_e2e_openai_surface.py), so the default model serves tools out of the box.
DEFAULT_MODEL_TEMPLATE = "chatml-tools"


def load_chat_template(value: str) -> str:
    """The template text `value` names: a bundled name (`chatml-tools`) or a path to a Jinja file."""
    path = BUNDLED.get(value) or Path(value)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"chat template {value!r} is neither a readable file nor one of the bundled "
                         f"templates ({', '.join(sorted(BUNDLED))}): {exc.strerror}") from None


def supports_tools(template: str | None) -> bool:
    """Whether the template renders the `tools` variable (a template that never reads it would drop the
    tools silently, so tool calling is refused with it)."""
    return bool(template) and re.search(r"\btools\b", _code(template)) is not None


def _code(template: str) -> str:
    """The template's Jinja statements and expressions (its comments and literal text do not count)."""
    return "\n".join(re.findall(r"\{[{%](.*?)[%}]\}", template, flags=re.S))
