"""GPU launch settings, read by the launch code at every launch.

A kernel compiled with ``cache=True`` freezes the module globals it reads, so
these values are passed to launches and never read inside a kernel. The
simulator tests shrink them so that a handful of elements already spans
several blocks with a ragged last one.
"""

threads_per_block = 256
"""Threads per block of every GPU kernel. A power of two (the shared-memory
reductions halve it at every step), at most 256 (the kernels' launch
bounds, ``cuda._LAUNCH_BOUNDS``)."""

channel_lanes = 32
"""Threads of a block along its x axis, a power of two dividing
``threads_per_block``: a warp's worth, so that channels-last threads of a warp
read neighbouring channels (one coalesced access), and NCHW ones neighbouring
positions. The block's other axis takes ``threads_per_block // channel_lanes``
rows of threads."""

reduction_blocks = 1024
"""Blocks a per-channel reduction aims for, over all channels together: each
channel gets ``max(1, reduction_blocks // C)`` blocks (fewer if it has fewer
elements than that many blocks hold), whose partial sums are then merged."""

element_blocks = 8192
"""Most blocks of an element-wise pass; each thread strides over the rest."""
