// Uses models/model.pt with libtorch alone: no Python, no code from this repository.
//   mnist_classify MODEL IMAGES_IDX LABELS_IDX   accuracy on an MNIST IDX pair (e.g. the test set)
//   mnist_classify MODEL IMAGE...                digit and probability for 28x28 PGM/PNG images
#include <torch/script.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef HAVE_PNG
#include <png.h>
#endif

namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(path + ": cannot open");
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

bool is_idx(const std::vector<uint8_t>& bytes) {
  return bytes.size() >= 4 && bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08;
}

// An unsigned-byte IDX file: 0, 0, type 0x08, number of dimensions, big-endian sizes, data.
torch::Tensor read_idx(const std::string& path, int expected_dims) {
  std::vector<uint8_t> bytes = read_file(path);
  if (!is_idx(bytes) || bytes[3] != expected_dims)
    throw std::runtime_error(path + ": expected an unsigned-byte IDX file with " + std::to_string(expected_dims) +
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

// A binary PGM ("P5"): magic, width, height and maxval separated by whitespace or comments.
torch::Tensor read_pgm(const std::string& path, const std::vector<uint8_t>& bytes) {
  size_t pos = 2;
  auto next_number = [&]() {
    while (pos < bytes.size() && (std::isspace(bytes[pos]) || bytes[pos] == '#')) {
      if (bytes[pos] == '#')
        while (pos < bytes.size() && bytes[pos] != '\n') ++pos;
      else
        ++pos;
    }
    int64_t value = 0;
    if (pos >= bytes.size() || !std::isdigit(bytes[pos])) throw std::runtime_error(path + ": malformed PGM header");
    while (pos < bytes.size() && std::isdigit(bytes[pos])) value = value * 10 + (bytes[pos++] - '0');
    return value;
  };
  int64_t width = next_number(), height = next_number(), maxval = next_number();
  ++pos;  // the single whitespace byte before the pixels
  if (maxval <= 0 || maxval > 255) throw std::runtime_error(path + ": only 8-bit PGM is supported");
  if (bytes.size() < pos + size_t(width * height)) throw std::runtime_error(path + ": truncated PGM");
  torch::Tensor pixels = torch::from_blob(const_cast<uint8_t*>(bytes.data()) + pos, {height, width}, torch::kUInt8);
  return maxval == 255 ? pixels.clone() : (pixels.to(torch::kInt32) * 255 / maxval).to(torch::kUInt8);
}

torch::Tensor read_png(const std::string& path) {
#ifdef HAVE_PNG
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) throw std::runtime_error(path + ": " + image.message);
  image.format = PNG_FORMAT_GRAY;  // libpng converts colour and composites alpha onto this background
  png_color white{255, 255, 255};
  torch::Tensor pixels = torch::empty({image.height, image.width}, torch::kUInt8);
  if (!png_image_finish_read(&image, &white, pixels.data_ptr<uint8_t>(), 0, nullptr))
    throw std::runtime_error(path + ": " + image.message);
  return pixels;
#else
  throw std::runtime_error(path + ": this build has no PNG support (libpng was not found); use PGM");
#endif
}

// A 28x28 grayscale image as uint8 [1, 28, 28], light digit on dark as in MNIST.
torch::Tensor read_image(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  torch::Tensor pixels;
  if (bytes.size() >= 2 && bytes[0] == 'P' && bytes[1] == '5')
    pixels = read_pgm(path, bytes);
  else if (bytes.size() >= 8 && bytes[0] == 0x89 && bytes[1] == 'P' && bytes[2] == 'N' && bytes[3] == 'G')
    pixels = read_png(path);
  else
    throw std::runtime_error(path + ": not a binary PGM (P5) or PNG image");
  if (pixels.size(0) != 28 || pixels.size(1) != 28)
    throw std::runtime_error(path + ": expected a 28x28 image, got " + std::to_string(pixels.size(1)) + "x" +
                             std::to_string(pixels.size(0)) + " (mnist-predict handles any size)");
  torch::Tensor border = torch::cat({pixels[0], pixels[27], pixels.select(1, 0), pixels.select(1, 27)});
  if (border.to(torch::kFloat32).mean().item<float>() > 127) pixels = 255 - pixels;  // dark digit on light paper
  return pixels.unsqueeze(0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL IMAGES_IDX LABELS_IDX\n"
              << "       " << argv[0] << " MODEL IMAGE...   (28x28 PGM or PNG)\n";
    return 2;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();
    torch::NoGradGuard no_grad;
    if (argc == 4 && is_idx(read_file(argv[2]))) {
      // uint8 [N, 28, 28] is one of the model's accepted inputs; it scales to [0, 1] itself.
      torch::Tensor images = read_idx(argv[2], 3);
      torch::Tensor labels = read_idx(argv[3], 1).to(torch::kInt64);
      torch::Tensor logits = model.forward({images}).toTensor();
      int64_t correct = (logits.argmax(1) == labels).sum().item<int64_t>();
      int64_t total = labels.size(0);
      std::cout << "accuracy " << correct << "/" << total << " = " << double(correct) / double(total) << "\n";
      return 0;
    }
    for (int i = 2; i < argc; ++i) {
      torch::Tensor probabilities = model.get_method("probabilities")({read_image(argv[i])}).toTensor()[0];
      int64_t digit = probabilities.argmax().item<int64_t>();
      std::cout << argv[i] << ": " << digit << " (probability " << probabilities[digit].item<float>() << ")\n";
    }
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
