"""fmnist: ANN vs CNN vs transfer learning on Fashion-MNIST, tracked in MLflow."""
