"""Recipes: a method's declaration, key coercion, and the checks of a recipe before any model loads."""
