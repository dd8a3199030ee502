"""Objectives: losses, MoCo parts, methods (backbone + head + loss) and the registry that names them."""
