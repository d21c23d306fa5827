// Scores models/model.pt on MNIST IDX files with libtorch alone: no Python, no code from the repo.
//   mnist_classify MODEL IMAGES_IDX LABELS_IDX
#include <torch/script.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

// An unsigned-byte IDX file: 0, 0, type 0x08, number of dimensions, big-endian sizes, data.
static torch::Tensor read_idx(const std::string& path, int expected_dims) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(path + ": cannot open");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (bytes.size() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] != expected_dims)
    throw std::runtime_error(path + ": not an unsigned-byte IDX file with " + std::to_string(expected_dims) +
                             " dimensions");
  std::vector<int64_t> shape;
  size_t offset = 4, count = 1;
  for (int d = 0; d < expected_dims; ++d, offset += 4) {
    if (bytes.size() < offset + 4) throw std::runtime_error(path + ": truncated header");
    int64_t size = (int64_t(bytes[offset]) << 24) | (bytes[offset + 1] << 16) | (bytes[offset + 2] << 8) |
                   bytes[offset + 3];
    shape.push_back(size);
    count *= size;
  }
  if (bytes.size() != offset + count) throw std::runtime_error(path + ": size does not match its header");
  return torch::from_blob(bytes.data() + offset, shape, torch::kUInt8).clone();
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL IMAGES_IDX LABELS_IDX\n";
    return 2;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();
    // The model's input contract: float32 [N, 1, 28, 28] with pixels in [0, 1].
    torch::Tensor images = read_idx(argv[2], 3).unsqueeze(1).to(torch::kFloat32).div(255);
    torch::Tensor labels = read_idx(argv[3], 1).to(torch::kInt64);
    torch::NoGradGuard no_grad;
    torch::Tensor logits = model.forward({images}).toTensor();
    int64_t correct = (logits.argmax(1) == labels).sum().item<int64_t>();
    int64_t total = labels.size(0);
    std::cout << "accuracy " << correct << "/" << total << " = " << double(correct) / double(total) << "\n";
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
