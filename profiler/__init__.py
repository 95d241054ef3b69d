"""kvprof: the measuring half of kvsim (GPU kernel grids, output lengths, imports of published profiles)."""
