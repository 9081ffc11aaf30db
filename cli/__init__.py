"""The `cfb` command line (click). Heavy modules are imported inside commands, so serving stays fast."""
