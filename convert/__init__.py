"""The converter: plan, recipes, layouts, pipeline, CLI."""

from fmtconv.convert.api import convert, plan

__all__ = ["convert", "plan"]
