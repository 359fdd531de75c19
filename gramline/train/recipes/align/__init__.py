"""The alignment recipe: LiT text alignment on a frozen backbone (dino.txt)."""
