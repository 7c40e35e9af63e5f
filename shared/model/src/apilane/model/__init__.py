"""apilane's wire model: pure types and functions every service and tool shares. No I/O."""
