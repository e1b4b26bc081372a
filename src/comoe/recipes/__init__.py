"""Recipes: end-to-end jobs built from the library (the demo and its report), as torchtune separates
recipes from the library. Deliberately empty of imports (the command line reads recipes.settings)."""
