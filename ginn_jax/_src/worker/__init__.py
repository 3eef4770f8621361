"""Code that runs on the untrusted accelerator. The trusted runtime never
imports from here: it only sees `WorkOrder`s go out and `GradientReport`s come in."""
