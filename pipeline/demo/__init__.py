"""The demo's own data: captioned videos of moving shapes, and a detector that scores generated videos.

`shapes` makes the data set (MP4 files + a CSV manifest for `pomvid precompute`) and lists the
colour/direction pairs held out of training; `detector` measures the colour and the direction of motion
of a generated video and scores caption adherence.
"""
