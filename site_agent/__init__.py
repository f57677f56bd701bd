"""Site agent: runs the stages inside a hospital; only signed, filtered synthetic shards (or, in federated
mode, student updates trained on them) leave, through the export gate."""
