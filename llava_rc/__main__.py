"""``python -m llava_rc`` runs the demo (the README's main job)."""

from .demo import main

main()
