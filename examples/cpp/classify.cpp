// Uses models/model.pt with libtorch alone: no Python, no code from this repository.
//   mnist_classify MODEL IMAGES_IDX LABELS_IDX [CARD]
//       accuracy and the sha256 of the logits on an MNIST IDX pair (e.g. the test set), computed in one
//       batch and one image at a time; with the model card (models/model.json), checked against its
//       figures: the exit status is 1 if this machine computes other logits than the card's
//   mnist_classify MODEL IMAGE...   digit and probability for 28x28 PGM/PNG images
#include <torch/script.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <regex>
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

// SHA-256 (FIPS 180-4) in hex, for the logits' bytes: the model card records their hash.
std::string sha256_hex(const uint8_t* data, size_t size) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  // The message, a 1 bit, zeros up to 56 bytes modulo 64, and the message's length in bits, big-endian.
  std::vector<uint8_t> message(data, data + size);
  message.push_back(0x80);
  while (message.size() % 64 != 56) message.push_back(0);
  for (int shift = 56; shift >= 0; shift -= 8) message.push_back(uint8_t((uint64_t(size) * 8) >> shift));
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  for (size_t block = 0; block < message.size(); block += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      const uint8_t* word = &message[block + 4 * i];
      w[i] = (uint32_t(word[0]) << 24) | (uint32_t(word[1]) << 16) | (uint32_t(word[2]) << 8) | word[3];
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t v[8];
    std::copy(h, h + 8, v);
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = v[7] + (rotr(v[4], 6) ^ rotr(v[4], 11) ^ rotr(v[4], 25)) + ((v[4] & v[5]) ^ (~v[4] & v[6])) + k[i] + w[i];
      uint32_t t2 = (rotr(v[0], 2) ^ rotr(v[0], 13) ^ rotr(v[0], 22)) + ((v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]));
      std::copy_backward(v, v + 7, v + 8);  // h = g, g = f, ..., b = a
      v[4] += t1;
      v[0] = t1 + t2;
    }
    for (int i = 0; i < 8; ++i) h[i] += v[i];
  }
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

// The accuracy and the sha256 of the logits: float32 [N, 10], row-major, in the machine's byte order
// (little-endian on x86-64 and Arm, as the card's hash is taken).
struct Result {
  int64_t correct;
  double accuracy;
  std::string sha256;
};

Result score(const torch::Tensor& logits, const torch::Tensor& labels) {
  torch::Tensor rows = logits.contiguous();
  int64_t correct = (rows.argmax(1) == labels).sum().item<int64_t>();
  auto bytes = reinterpret_cast<const uint8_t*>(rows.data_ptr<float>());
  return {correct, double(correct) / double(labels.size(0)), sha256_hex(bytes, rows.numel() * sizeof(float))};
}

// The card's test accuracy and test-logits hash. The card is JSON that the export stage writes; these
// two values are found by their keys ("accuracy" appears once, "sha256" of test_logits follows it).
Result read_card(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  std::string text(bytes.begin(), bytes.end());
  std::smatch accuracy, sha256;
  size_t logits = text.find("\"test_logits\"");
  std::string after = logits == std::string::npos ? "" : text.substr(logits);
  if (!std::regex_search(text, accuracy, std::regex(R"re("accuracy":\s*([0-9.eE+-]+))re")) ||
      !std::regex_search(after, sha256, std::regex(R"re("sha256":\s*"([0-9a-f]{64})")re")))
    throw std::runtime_error(path + ": not a model card with test_logits.sha256 and metrics.accuracy");
  return {0, std::stod(accuracy[1]), sha256[1]};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL IMAGES_IDX LABELS_IDX [CARD]\n"
              << "       " << argv[0] << " MODEL IMAGE...   (28x28 PGM or PNG)\n";
    return 2;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();
    torch::NoGradGuard no_grad;
    if ((argc == 4 || argc == 5) && is_idx(read_file(argv[2]))) {
      // uint8 [N, 28, 28] is one of the model's accepted inputs; it scales to [0, 1] itself.
      torch::Tensor images = read_idx(argv[2], 3);
      torch::Tensor labels = read_idx(argv[3], 1).to(torch::kInt64);
      int64_t total = labels.size(0);
      // The model computes each image's logits alone, so one batch and one image at a time give the same bits.
      std::vector<torch::Tensor> one_by_one;
      for (int64_t i = 0; i < total; ++i) one_by_one.push_back(model.forward({images.slice(0, i, i + 1)}).toTensor());
      std::vector<std::pair<std::string, Result>> results = {
          {"batch " + std::to_string(total), score(model.forward({images}).toTensor(), labels)},
          {"batch 1", score(torch::cat(one_by_one), labels)}};
      for (const auto& [name, result] : results)
        std::cout << name << ": accuracy " << result.correct << "/" << total << " = " << result.accuracy
                  << ", logits sha256 " << result.sha256 << "\n";
      const Result& whole = results[0].second;
      if (argc == 5) {
        Result card = read_card(argv[4]);
        std::cout << "card: accuracy " << card.accuracy << ", logits sha256 " << card.sha256 << "\n";
        if (card.sha256 != whole.sha256 || card.accuracy != whole.accuracy) {
          std::cerr << "error: this machine computes other logits than the card records (" << argv[4] << ")\n";
          return 1;
        }
      }
      if (results[1].second.sha256 != whole.sha256) {
        std::cerr << "error: one image at a time gives other logits than the whole batch\n";
        return 1;
      }
      return 0;
    }
    for (int i = 2; i < argc; ++i) {
      torch::Tensor probabilities = model.get_method("probabilities")({read_image(argv[i])}).toTensor()[0];
      int64_t digit = probabilities.argmax().item<int64_t>();
      std::cout << argv[i] << ": " << digit << " (probability " << probabilities[digit].item<float>() << ")\n";
    }
  } catch (const c10::Error& error) {  // libtorch's what() appends a C++ stack trace: the message alone
    std::string message = error.what_without_backtrace();
    std::cerr << "error: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
