"""What a run shows: TensorBoard event files and the console progress."""
