"""Site agent: runs the pipeline inside a hospital and enforces the export gate (see issue 3)."""
