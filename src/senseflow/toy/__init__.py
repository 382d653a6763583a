"""The toy world: a procedural text-to-image task where distillation is measurable on CPU.

``world`` generates captioned images, ``text`` builds the matching tokenizer and tiny CLIP text
encoder, ``evaluator`` scores generated images against their prompts.  Submodules are imported
lazily by users (``from senseflow.toy.world import ToyWorld``) so importing the package is cheap.
"""
