"""Segment engines: plain `SegmentRequest`s in, plain `SegmentOutput`s out (see `trl_treepo.sampling`)."""
