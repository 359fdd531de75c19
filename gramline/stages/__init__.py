"""Stage entry points: `python -m gramline.stages.<stage>` is each container's command."""
