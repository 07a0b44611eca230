"""lm-eval task definitions shipped with the framework (found through ``lingua.eval.task_manager``).

Each folder holds one task's YAML and its helpers; lm-eval loads them by path, so this package
exists only so that packaging installs the helper modules with the YAML files.
"""
