"""Prompts of the two training phases and of synthesis.

The concept phase uses `PromptConfig.concept_template` ("an image of a {token}"). The condition
phase and the SADF pairs use the paper's template "an image of a [V] with a [class] crack":

    no defect             -> empty_template  "an image of a sks"
    one class             -> template        "an image of a sks with a blowhole crack"
    several classes       -> multi_template  "an image of a sks with a blowhole and break defect"

With several classes, the distinct class names are listed once each, in increasing category id
order, joined as "a and b" or "a, b and c"; the paper's "... crack" suffix would read "a blowhole
and break crack", so a separate template says "defect" instead. A class name that already ends
with the word following {classes} is not doubled: class "crack" gives "... with a crack", not
"... with a crack crack". All four templates and the identifier token are parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class PromptConfig:
    token: str = field(default="sks", metadata={"help": "the rare identifier token [V]"})
    template: str = field(default="an image of a {token} with a {classes} crack",
                          metadata={"help": "prompt for one defect class"})
    multi_template: str = field(default="an image of a {token} with a {classes} defect",
                                metadata={"help": "prompt for several defect classes"})
    empty_template: str = field(default="an image of a {token}", metadata={"help": "prompt without defects"})
    concept_template: str = field(default="an image of a {token}", metadata={"help": "concept-phase prompt"})


def join_names(names: Sequence[str]) -> str:
    """["a"] -> "a"; ["a", "b"] -> "a and b"; ["a", "b", "c"] -> "a, b and c"."""
    names = list(names)
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def make_prompt(class_names: Sequence[str], config: PromptConfig = PromptConfig()) -> str:
    """The prompt for an image whose defects have these class names (already in category-id
    order; repeats are dropped, keeping the first)."""
    unique = list(dict.fromkeys(class_names))
    if not unique:
        return config.empty_template.format(token=config.token, classes="")
    template = config.template if len(unique) == 1 else config.multi_template
    classes = join_names(unique)
    head, sep, tail = template.partition("{classes}")
    next_word = tail.split()[0] if sep and tail.startswith(" ") and tail.split() else None
    if next_word and classes.split()[-1] == next_word:
        template = head + "{classes}" + tail[len(" " + next_word):]
    return template.format(token=config.token, classes=classes)


def prompt_for_categories(category_ids: Sequence[int], names: dict[int, str],
                          config: PromptConfig = PromptConfig()) -> str:
    """`make_prompt` from category ids (sorted by id, names looked up in `names`)."""
    return make_prompt([names[c] for c in sorted(set(int(c) for c in category_ids))], config)


def concept_prompt(config: PromptConfig = PromptConfig()) -> str:
    return config.concept_template.format(token=config.token)
