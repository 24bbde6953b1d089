"""Messages, rounds and aggregation between a coordinator and hospital nodes."""
