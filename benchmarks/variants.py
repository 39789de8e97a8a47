"""A/B variants as text: a named variant, or ``name:section.field=value;...`` (values as YAML).

The A/B benchmarks (teacher_ab, distill_ab) take ``--variants`` in this form; each names the config sections
its variants may change."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import yaml

Changes = dict[str, dict]


def parse_value(text: str):
    """A value as YAML, where ``1e-4`` (which YAML 1.1 reads as a string) is a number."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_variant(text: str, named: Mapping[str, Changes], sections: tuple[str, ...]) -> tuple[str, Changes]:
    """A name from ``named``, or ``name:section.field=value;...`` with sections from ``sections``; sections
    that change nothing are left out."""
    if ":" not in text:
        if text not in named:
            raise argparse.ArgumentTypeError(f"unknown variant {text!r}: one of {', '.join(named)} or "
                                             "name:section.field=value;...")
        return text, dict(named[text])
    name, _, body = text.partition(":")
    changes: Changes = {section: {} for section in sections}
    for item in filter(None, (p.strip() for p in body.split(";"))):
        key, sep, value = item.partition("=")
        section, _, field = key.partition(".")
        if not sep or section not in changes or not field:
            forms = ", ".join(f"{s}.FIELD=VALUE" for s in sections)
            raise argparse.ArgumentTypeError(f"variant {name}: {item!r} is not one of {forms}")
        changes[section][field] = parse_value(value)
    return name, {section: fields for section, fields in changes.items() if fields}


def parse_variants(text: str, named: Mapping[str, Changes], sections: tuple[str, ...]) -> list[tuple[str, Changes]]:
    """Comma-separated variants; commas inside brackets belong to a value (``network.channel_mult=[1, 2, 2]``)."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [parse_variant(v.strip(), named, sections) for v in [*items, current] if v.strip()]
